//! Work moved off a commit's critical path.

/// Collections of small items (heads, extent items) shorter than this are
/// freed in place by [`drop_later`]: starting a thread costs more.
pub const SMALL_ITEMS_MIN: usize = 64 * 1024;

/// Drops `items` on a short-lived thread if there are at least `min_len`
/// of them (else here): for large collections freed at the end of a
/// commit (a million heads, displaced items or B+tree nodes are millions
/// of deallocations, tens of milliseconds), so the commit returns, and the
/// next one can start, without waiting for the frees. If the thread
/// cannot be started, `items` is dropped here.
pub fn drop_later<T: Send + 'static>(items: Vec<T>, min_len: usize) {
    if items.len() < min_len {
        return;
    }
    // On a spawn error the closure, and `items` with it, is dropped here.
    let _ = std::thread::Builder::new()
        .name("refd-drop".into())
        .spawn(move || drop(items));
}
