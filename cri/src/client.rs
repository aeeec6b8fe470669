//! A CRI v1 client over a Unix socket: tonic's generic gRPC client with the
//! prost codec and the hand-written messages of [`crate::api`].
//!
//! [`CriClient`] is async (cheap to clone: calls share one HTTP/2
//! connection, so many pods can be driven at once); [`BlockingCriClient`]
//! wraps it with its own single-threaded tokio runtime for synchronous
//! callers such as tests. Every call has a deadline.
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::api::{self, method};
use crate::error::{Error, Result};

/// Deadline of one call unless the caller sets another. RunPodSandbox runs
/// the whole CNI chain; on a busy machine that can take a while.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// An async CRI client (RuntimeService and ImageService).
#[derive(Clone, Debug)]
pub struct CriClient {
    channel: Channel,
    socket: PathBuf,
    call_timeout: Duration,
}

impl CriClient {
    /// Connects to the runtime's gRPC socket; the connection attempt itself
    /// is bounded by `connect_timeout`.
    pub async fn connect(socket: &Path, connect_timeout: Duration) -> Result<CriClient> {
        let path = socket.to_path_buf();
        // The URI only satisfies the HTTP/2 layer; the connector ignores it.
        let endpoint = Endpoint::from_static("http://cri.localhost")
            .connect_timeout(connect_timeout)
            .timeout(DEFAULT_CALL_TIMEOUT);
        let connect = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }));
        let channel = tokio::time::timeout(connect_timeout, connect)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("connecting to {}", socket.display()),
                after: connect_timeout,
            })?
            .map_err(|source| Error::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(CriClient {
            channel,
            socket: socket.to_path_buf(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
        })
    }

    /// The same client with another per-call deadline.
    pub fn with_call_timeout(mut self, timeout: Duration) -> CriClient {
        self.call_timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One unary call of `method` with the client's deadline.
    async fn unary<Req, Resp>(&self, method: &'static str, req: Req) -> Result<Resp>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        let call = async move {
            grpc.ready().await.map_err(|e| Error::Rpc {
                method,
                status: tonic::Status::unavailable(format!("connection not ready: {e}")),
            })?;
            let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
            let mut request = tonic::Request::new(req);
            // The runtime sees the deadline too (grpc-timeout).
            request.set_timeout(self.call_timeout);
            grpc.unary(request, PathAndQuery::from_static(method), codec)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| Error::Rpc { method, status })
        };
        tokio::time::timeout(self.call_timeout, call)
            .await
            .map_err(|_| Error::Timeout {
                what: method.to_string(),
                after: self.call_timeout,
            })?
    }

    pub async fn version(&self) -> Result<api::VersionResponse> {
        let req = api::VersionRequest {
            version: "v1".into(),
        };
        self.unary(method::VERSION, req).await
    }

    /// RunPodSandbox: creates the sandbox, its network namespace, and runs
    /// the CNI ADD of the network (and of `loopback`). Returns its ID.
    pub async fn run_pod_sandbox(&self, config: api::PodSandboxConfig) -> Result<String> {
        let req = api::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        };
        let resp: api::RunPodSandboxResponse = self.unary(method::RUN_POD_SANDBOX, req).await?;
        if resp.pod_sandbox_id.is_empty() {
            return Err(Error::Unexpected(
                "RunPodSandbox returned an empty sandbox ID".into(),
            ));
        }
        Ok(resp.pod_sandbox_id)
    }

    /// StopPodSandbox: stops every container of the sandbox and runs the
    /// CNI DEL. Idempotent in the API: stopping a stopped sandbox succeeds.
    pub async fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        let req = api::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        let _: api::StopPodSandboxResponse = self.unary(method::STOP_POD_SANDBOX, req).await?;
        Ok(())
    }

    /// RemovePodSandbox: removes a stopped sandbox. Idempotent in the API:
    /// removing an unknown sandbox succeeds.
    pub async fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        let req = api::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        let _: api::RemovePodSandboxResponse = self.unary(method::REMOVE_POD_SANDBOX, req).await?;
        Ok(())
    }

    /// PodSandboxStatus, verbose (with the runtime's `info`).
    pub async fn pod_sandbox_status(&self, id: &str) -> Result<api::PodSandboxStatusResponse> {
        let req = api::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        };
        self.unary(method::POD_SANDBOX_STATUS, req).await
    }

    pub async fn list_pod_sandbox(&self) -> Result<Vec<api::PodSandbox>> {
        let resp: api::ListPodSandboxResponse = self
            .unary(
                method::LIST_POD_SANDBOX,
                api::ListPodSandboxRequest::default(),
            )
            .await?;
        Ok(resp.items)
    }

    /// CreateContainer in a sandbox (`sandbox_config` is the config the
    /// sandbox was run with, as kubelet passes it). Returns the container ID.
    pub async fn create_container(
        &self,
        sandbox_id: &str,
        config: api::ContainerConfig,
        sandbox_config: api::PodSandboxConfig,
    ) -> Result<String> {
        let req = api::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.into(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        };
        let resp: api::CreateContainerResponse = self.unary(method::CREATE_CONTAINER, req).await?;
        if resp.container_id.is_empty() {
            return Err(Error::Unexpected(
                "CreateContainer returned an empty container ID".into(),
            ));
        }
        Ok(resp.container_id)
    }

    pub async fn start_container(&self, id: &str) -> Result<()> {
        let req = api::StartContainerRequest {
            container_id: id.into(),
        };
        let _: api::StartContainerResponse = self.unary(method::START_CONTAINER, req).await?;
        Ok(())
    }

    /// StopContainer with `timeout_secs` between SIGTERM and SIGKILL.
    pub async fn stop_container(&self, id: &str, timeout_secs: i64) -> Result<()> {
        let req = api::StopContainerRequest {
            container_id: id.into(),
            timeout: timeout_secs,
        };
        let _: api::StopContainerResponse = self.unary(method::STOP_CONTAINER, req).await?;
        Ok(())
    }

    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let req = api::RemoveContainerRequest {
            container_id: id.into(),
        };
        let _: api::RemoveContainerResponse = self.unary(method::REMOVE_CONTAINER, req).await?;
        Ok(())
    }

    pub async fn container_status(&self, id: &str) -> Result<api::ContainerStatus> {
        let req = api::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let resp: api::ContainerStatusResponse = self.unary(method::CONTAINER_STATUS, req).await?;
        resp.status
            .ok_or_else(|| Error::Unexpected(format!("ContainerStatus of {id} without status")))
    }

    pub async fn list_containers(&self) -> Result<Vec<api::Container>> {
        let resp: api::ListContainersResponse = self
            .unary(
                method::LIST_CONTAINERS,
                api::ListContainersRequest::default(),
            )
            .await?;
        Ok(resp.containers)
    }

    pub async fn list_images(&self) -> Result<Vec<api::Image>> {
        let resp: api::ListImagesResponse = self
            .unary(method::LIST_IMAGES, api::ListImagesRequest::default())
            .await?;
        Ok(resp.images)
    }

    /// What kubelet does when it tears everything down: StopPodSandbox and
    /// RemovePodSandbox for every sandbox the runtime knows. Every sandbox
    /// is tried; returns the IDs found, or the first failure.
    pub async fn remove_all_sandboxes(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        let mut first_error = None;
        for sb in self.list_pod_sandbox().await? {
            // Remove even if stop failed: the runtime retries the stop.
            let stopped = self.stop_pod_sandbox(&sb.id).await;
            let removed = self.remove_pod_sandbox(&sb.id).await;
            for r in [stopped, removed] {
                if let Err(e) = r {
                    first_error.get_or_insert(e);
                }
            }
            ids.push(sb.id);
        }
        match first_error {
            None => Ok(ids),
            Some(e) => Err(e),
        }
    }
}

/// [`CriClient`] for synchronous callers: each method blocks on the
/// client's own current-thread runtime.
#[derive(Debug)]
pub struct BlockingCriClient {
    rt: tokio::runtime::Runtime,
    inner: CriClient,
}

impl BlockingCriClient {
    pub fn connect(socket: &Path, connect_timeout: Duration) -> Result<BlockingCriClient> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("cannot build a tokio runtime", e))?;
        let inner = rt.block_on(CriClient::connect(socket, connect_timeout))?;
        Ok(BlockingCriClient { rt, inner })
    }

    /// The same client with another per-call deadline.
    pub fn with_call_timeout(mut self, timeout: Duration) -> BlockingCriClient {
        self.inner = self.inner.with_call_timeout(timeout);
        self
    }

    /// The async client (e.g. for calls made concurrently through
    /// [`block_on`](Self::block_on)).
    pub fn async_client(&self) -> &CriClient {
        &self.inner
    }

    /// Runs any future on this client's runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn version(&self) -> Result<api::VersionResponse> {
        self.rt.block_on(self.inner.version())
    }

    pub fn run_pod_sandbox(&self, config: api::PodSandboxConfig) -> Result<String> {
        self.rt.block_on(self.inner.run_pod_sandbox(config))
    }

    pub fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        self.rt.block_on(self.inner.stop_pod_sandbox(id))
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        self.rt.block_on(self.inner.remove_pod_sandbox(id))
    }

    pub fn pod_sandbox_status(&self, id: &str) -> Result<api::PodSandboxStatusResponse> {
        self.rt.block_on(self.inner.pod_sandbox_status(id))
    }

    pub fn list_pod_sandbox(&self) -> Result<Vec<api::PodSandbox>> {
        self.rt.block_on(self.inner.list_pod_sandbox())
    }

    pub fn create_container(
        &self,
        sandbox_id: &str,
        config: api::ContainerConfig,
        sandbox_config: api::PodSandboxConfig,
    ) -> Result<String> {
        self.rt.block_on(
            self.inner
                .create_container(sandbox_id, config, sandbox_config),
        )
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        self.rt.block_on(self.inner.start_container(id))
    }

    pub fn stop_container(&self, id: &str, timeout_secs: i64) -> Result<()> {
        self.rt
            .block_on(self.inner.stop_container(id, timeout_secs))
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        self.rt.block_on(self.inner.remove_container(id))
    }

    pub fn container_status(&self, id: &str) -> Result<api::ContainerStatus> {
        self.rt.block_on(self.inner.container_status(id))
    }

    pub fn list_containers(&self) -> Result<Vec<api::Container>> {
        self.rt.block_on(self.inner.list_containers())
    }

    pub fn list_images(&self) -> Result<Vec<api::Image>> {
        self.rt.block_on(self.inner.list_images())
    }

    pub fn remove_all_sandboxes(&self) -> Result<Vec<String>> {
        self.rt.block_on(self.inner.remove_all_sandboxes())
    }
}
