//! Reading a resolv.conf file into the DNS settings of an IPAM result
//! (`ipam.resolvConf`), as the reference host-local does (`dns.go`).

use std::io;
use std::path::Path;

/// DNS settings found in a resolv.conf file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<String>,
    pub domain: Option<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

/// Reads `path`. Errors only when the file cannot be read.
pub fn read(path: &Path) -> io::Result<ResolvConf> {
    Ok(parse(&std::fs::read_to_string(path)?))
}

/// Parses resolv.conf text: `nameserver` (one per line), `domain` (last one
/// wins), `search` and `options` (all words, accumulated). Comments (`#`,
/// `;`), blank lines and lines of one word are skipped.
pub fn parse(text: &str) -> ResolvConf {
    let mut conf = ResolvConf::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [keyword, first, rest @ ..] = fields.as_slice() else {
            continue;
        };
        let words = || {
            std::iter::once(*first)
                .chain(rest.iter().copied())
                .map(String::from)
        };
        match *keyword {
            "nameserver" => conf.nameservers.push(first.to_string()),
            "domain" => conf.domain = Some(first.to_string()),
            "search" => conf.search.extend(words()),
            "options" => conf.options.extend(words()),
            _ => {}
        }
    }
    conf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_the_reference() {
        let conf = parse(
            "# comment\n; other comment\n\nnameserver 10.0.0.1\nnameserver   fd00::53 \n\
             domain a.example\ndomain b.example\nsearch x.example y.example\nsearch z.example\n\
             options ndots:5 rotate\nsortlist 10.0.0.0\nnameserver\n",
        );
        assert_eq!(conf.nameservers, vec!["10.0.0.1", "fd00::53"]);
        assert_eq!(conf.domain.as_deref(), Some("b.example"));
        assert_eq!(conf.search, vec!["x.example", "y.example", "z.example"]);
        assert_eq!(conf.options, vec!["ndots:5", "rotate"]);
    }

    #[test]
    fn missing_file_is_an_error() {
        assert!(read(Path::new("/nonexistent/resolv.conf")).is_err());
    }
}
