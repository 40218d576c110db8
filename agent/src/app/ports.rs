//! Private ports for app versions.
//!
//! A new version gets a port the kernel reports free: [`pick_free`] binds `127.0.0.1:0`,
//! reads the port and closes the socket, and the app binds it moments later. Between the
//! two, another process may take the port (an outgoing connection's ephemeral port, or
//! another program picking ports the same way). That race is accepted: the window is a
//! few milliseconds, the kernel hands out ephemeral ports in rotation so an immediate reuse
//! is unlikely, and the consequence is benign: the app fails to bind, exits, and the
//! start fails its health check with the app's "address in use" message in the report;
//! the daemon can pick another port and try again. Reserving the port instead (passing the
//! bound socket to the app) would need every app to accept an inherited socket.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// How many ports to draw before giving up when every draw is in `avoid`.
const ATTEMPTS: usize = 16;

/// A port on 127.0.0.1 that is free right now and not in `avoid` (the ports of versions
/// still running or draining, which may be between connections).
pub fn pick_free(avoid: &[u16]) -> io::Result<u16> {
    pick(avoid, || {
        TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    })
}

fn pick(avoid: &[u16], mut draw: impl FnMut() -> io::Result<TcpListener>) -> io::Result<u16> {
    // Refused sockets are held until the end, so the kernel cannot hand the same port back.
    let mut held = Vec::new();
    for _ in 0..ATTEMPTS {
        let socket = draw()?;
        let port = socket.local_addr()?.port();
        if !avoid.contains(&port) {
            return Ok(port);
        }
        held.push(socket);
    }
    Err(io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        format!("no free port on 127.0.0.1 outside {avoid:?} after {ATTEMPTS} tries"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(port: u16) -> io::Result<TcpListener> {
        TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    #[test]
    fn a_picked_port_is_free_to_bind() {
        let port = pick_free(&[]).unwrap();
        assert_ne!(port, 0);
        bind(port).expect("the picked port is bindable");
    }

    #[test]
    fn avoided_ports_are_skipped_and_endless_avoidance_is_an_error() {
        let avoided = bind(0).unwrap();
        let avoided_port = avoided.local_addr().unwrap().port();
        let mut avoided = Some(avoided);
        // The first draw returns the avoided port, the next a fresh one.
        let port = pick(&[avoided_port], || match avoided.take() {
            Some(socket) => Ok(socket),
            None => bind(0),
        })
        .unwrap();
        assert_ne!(port, avoided_port);

        let always = bind(0).unwrap();
        let always_port = always.local_addr().unwrap().port();
        let error = pick(&[always_port], || always.try_clone()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrNotAvailable);
        assert!(
            error.to_string().contains(&always_port.to_string()),
            "{error}"
        );
    }
}
