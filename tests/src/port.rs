//! Loopback ports for the nodes of a test.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

use rand::Rng;

/// Ports are drawn below Linux's default ephemeral range (32768-60999), so that an
/// outgoing connection of some node cannot take a port that a stopped node is about
/// to bind again on restart.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

/// Tries before giving up: a busy machine has a few ports taken, never most of them.
const MAX_PORT_TRIES: usize = 1_000;

/// Ports handed out by this process; never handed out twice, as a test keeps a port
/// for the life of its node, across restarts.
static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Returns a loopback TCP port that was free a moment ago and that no other caller
/// in this process has received.
pub fn free_port() -> u16 {
    let mut taken = TAKEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let taken = taken.get_or_insert_with(HashSet::new);
    let mut rng = rand::thread_rng();
    for _ in 0..MAX_PORT_TRIES {
        let port = rng.gen_range(PORT_RANGE);
        if taken.contains(&port) {
            continue;
        }
        // Binding proves nobody listens there now; the listener closes at once.
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free loopback port in {PORT_RANGE:?} after {MAX_PORT_TRIES} tries");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_not_handed_out_twice() {
        let ports: HashSet<u16> = (0..200).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 200);
    }
}
