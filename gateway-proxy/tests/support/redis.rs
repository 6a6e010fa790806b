//! A real `redis-server` on a free port, started (and stopped, and restarted) by the test.
//!
//! Without `redis-server` on the machine a test says so and passes, except under CI (`CI`
//! set), where `.ci/run` installs it and its absence fails the test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct RedisServer {
    port: u16,
    password: Option<String>,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one, or says why not and returns `None` when `redis-server` is not
    /// installed (failing the test under CI).
    pub async fn start() -> Option<Self> {
        Self::start_with(None).await
    }

    /// Starts one that requires `password`.
    pub async fn start_with(password: Option<&str>) -> Option<Self> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must have redis-server: .ci/run installs it"
            );
            eprintln!("skipped: no redis-server (apt-get install redis-server)");
            return None;
        }
        let port = gateway_core::test_util::listen_addr().port();
        let dir = std::env::temp_dir().join(format!("gateway-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Self {
            port,
            password: password.map(str::to_owned),
            dir,
            child: None,
        };
        server.restart().await;
        Some(server)
    }

    /// `redis://127.0.0.1:PORT/0`, with the password when there is one.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills it (as a crash would) and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same port, and waits until it answers `PING`.
    pub async fn restart(&mut self) {
        self.stop();
        let port = self.port.to_string();
        let mut args = vec![
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--loglevel",
            "warning",
        ];
        if let Some(password) = &self.password {
            args.extend(["--requirepass", password]);
        }
        let spawn = || {
            Command::new("redis-server")
                .args(&args)
                .current_dir(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("redis-server could not be started: {e}"))
        };
        let mut child = spawn();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if self.pings().await {
                self.child = Some(child);
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not answer on port {port}"
            );
            // It exits when it cannot listen (the port briefly taken): start it again.
            if let Ok(Some(_)) = child.try_wait() {
                child = spawn();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends one command (its words as RESP bulk strings) on a new connection; the raw
    /// reply, as far as its first line and one bulk string.
    pub async fn command(&self, words: &[&[u8]]) -> Vec<u8> {
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let mut out = format!("*{}\r\n", words.len()).into_bytes();
        for word in words {
            out.extend_from_slice(format!("${}\r\n", word.len()).as_bytes());
            out.extend_from_slice(word);
            out.extend_from_slice(b"\r\n");
        }
        conn.write_all(&out).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0; 4096];
        while !got.ends_with(b"\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
                .await
                .expect("redis answers")
                .unwrap();
            assert!(n > 0, "redis closed the connection");
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// A command whose reply is an integer.
    pub async fn integer(&self, words: &[&[u8]]) -> i64 {
        let reply = self.command(words).await;
        let text = String::from_utf8_lossy(&reply);
        text.trim()
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not an integer reply: {text:?}"))
    }

    async fn pings(&self) -> bool {
        let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let hello = match &self.password {
            Some(password) => format!("AUTH {password}\r\nPING\r\n"),
            None => "PING\r\n".to_owned(),
        };
        if conn.write_all(hello.as_bytes()).await.is_err() {
            return false;
        }
        let mut buf = [0; 64];
        let mut got = Vec::new();
        while !got.windows(5).any(|w| w == b"+PONG") {
            match tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return false,
            }
        }
        true
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
