//! Scratch buffers lent by the thread: a process holds many networks but computes on few
//! threads, so a network holds its buffers only while it computes.

use std::cell::Cell;
use std::thread::LocalKey;

/// Takes this thread's buffers (empty ones during thread teardown).
pub(crate) fn take<S: Default>(key: &'static LocalKey<Cell<S>>) -> S {
    key.try_with(Cell::take).unwrap_or_default()
}

/// Gives the buffers back to this thread (during thread teardown they are simply dropped).
pub(crate) fn give_back<S>(key: &'static LocalKey<Cell<S>>, scratch: S) {
    let _ = key.try_with(|s| s.set(scratch));
}

/// `bytes` of this thread's buffers, which are shared by whatever computes on it and so in
/// no network's heap.
pub(crate) fn thread_bytes<S: Default>(
    key: &'static LocalKey<Cell<S>>,
    bytes: impl FnOnce(&S) -> usize,
) -> usize {
    key.try_with(|s| {
        let scratch = s.take();
        let n = bytes(&scratch);
        s.set(scratch);
        n
    })
    .unwrap_or(0)
}
