//! Work moved off a commit's critical path.

/// Drops `value` on a short-lived thread: for large collections freed at
/// the end of a commit (a million heads, displaced items or B+tree nodes
/// are millions of deallocations, tens of milliseconds), so the commit
/// returns, and the next one can start, without waiting for the frees.
/// If the thread cannot be started, `value` is dropped here.
pub fn drop_later<T: Send + 'static>(value: T) {
    // On a spawn error the closure, and `value` with it, is dropped here.
    let _ = std::thread::Builder::new()
        .name("refd-drop".into())
        .spawn(move || drop(value));
}
