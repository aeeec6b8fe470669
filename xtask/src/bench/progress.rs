//! The progress display: `[step N/M | mm:ss] what is running`, and a
//! counter line for long loops (rewritten in place on a terminal, every
//! tenth otherwise so logs stay short).
use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    total: usize,
    done: usize,
    start: Instant,
    tty: bool,
}

impl Progress {
    pub fn new(total: usize) -> Progress {
        Progress {
            total,
            done: 0,
            start: Instant::now(),
            tty: std::io::stdout().is_terminal(),
        }
    }

    pub fn elapsed(&self) -> String {
        let s = self.start.elapsed().as_secs();
        format!("{:02}:{:02}", s / 60, s % 60)
    }

    pub fn elapsed_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Starts the next step.
    pub fn step(&mut self, what: &str) {
        self.done += 1;
        // The plan is computed up front; never show N > M if it was off.
        self.total = self.total.max(self.done);
        println!(
            "[step {:>3}/{} | {}] {what}",
            self.done,
            self.total,
            self.elapsed()
        );
    }

    /// `done` of `n` items of the current step.
    pub fn count(&self, what: &str, done: usize, n: usize) {
        if self.tty {
            print!("\r        {what} {done}/{n}  ({})   ", self.elapsed());
            let _ = std::io::stdout().flush();
            if done == n {
                println!();
            }
        } else if done == n || done.is_multiple_of((n / 10).max(1)) {
            println!("        {what} {done}/{n}  ({})", self.elapsed());
        }
    }

    /// A result line under the current step.
    pub fn note(&self, text: &str) {
        println!("        {text}");
    }
}
