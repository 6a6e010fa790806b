//! Starting the proxies the load and conformance runs measure.

use std::io::{self, BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Spawns `cmd` (`program`, which binds port 0: the gateway, `hyper-proxy`) and reads the
/// address from the `... listening on http://ADDR` line it prints first.
///
/// # Errors
///
/// If it does not start, or its first line names no address.
pub fn spawn_listening(cmd: &mut Command, program: &Path) -> io::Result<(Child, SocketAddr)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| io::Error::other(format!("{}: {e}", program.display())))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("no stdout"))?;
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // The rest of what it prints is read too: a closed pipe would fail its next write.
    std::thread::spawn(move || io::copy(&mut reader, &mut io::sink()));
    let addr = line
        .trim()
        .split_once("listening on http://")
        .and_then(|(_, a)| a.parse().ok())
        .ok_or_else(|| io::Error::other(format!("unexpected output {line:?}")))?;
    Ok((child, addr))
}

/// A loopback address nothing listens on now, for a proxy that cannot bind port 0.
///
/// # Errors
///
/// If no port can be had.
pub fn free_addr() -> io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Waits (up to 5 s) until `addr` accepts connections.
///
/// # Errors
///
/// If it does not by then.
pub fn wait_accepting(addr: SocketAddr) -> io::Result<()> {
    for _ in 0..200 {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(io::Error::other(format!("nothing accepts on {addr}")))
}

/// Starts nginx through `cmd` (`nginx`, or `taskset` running it) on the config file
/// `conf`, with `dir` as its prefix: its output dropped, its errors on ours.
///
/// # Errors
///
/// If it cannot be started.
pub fn spawn_nginx(mut cmd: Command, dir: &Path, conf: &Path) -> io::Result<Child> {
    cmd.arg("-p").arg(dir).arg("-c").arg(conf);
    spawn_quiet(cmd, "nginx")
}

/// Starts HAProxy through `cmd` (`haproxy`, or `taskset` running it) in the foreground on
/// the config file `conf`: its output dropped, its errors on ours.
///
/// # Errors
///
/// If it cannot be started.
pub fn spawn_haproxy(mut cmd: Command, conf: &Path) -> io::Result<Child> {
    cmd.arg("-db").arg("-f").arg(conf);
    spawn_quiet(cmd, "haproxy")
}

fn spawn_quiet(mut cmd: Command, name: &str) -> io::Result<Child> {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| io::Error::other(format!("{name}: {e}")))
}

/// The `http` block's lines that keep an unprivileged nginx's files under `dir` (it would
/// write under its compiled-in prefix otherwise).
pub fn nginx_temp_paths(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;"
    )
}
