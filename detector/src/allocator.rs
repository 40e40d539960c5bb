//! The allocator of the detector (and of the benches that measure it): mimalloc, told to give
//! freed memory back to the system at once.
//!
//! Under memory bounds, networks of megabytes are evicted and restored all the time. mimalloc
//! by default keeps freed pages for a second before returning them; with 3,000 devices under a
//! 500 MB budget that measured 858–869 MB of peak RSS against 734–752 MB when returning them
//! at once (glibc's malloc: 831–858 MB). The price is page faults on memory taken again: that
//! run (every record a restore or an eviction) took 40 s instead of 20 s. A detector whose
//! networks fit its budget barely frees memory and does not pay it. `MIMALLOC_PURGE_DELAY=1000`
//! (milliseconds) restores mimalloc's default.

pub use mimalloc::MiMalloc;

/// `mi_option_purge_delay` in `mimalloc.h` (libmimalloc-sys does not name it); its default
/// in the bundled mimalloc 3, 1000 ms, is what the test below checks to catch a renumbering.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc return freed memory to the system at once, unless `MIMALLOC_PURGE_DELAY`
/// says otherwise (the trade: fewer page faults for more resident memory). Call early in
/// `main`.
pub fn return_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting a mimalloc option is allowed at any time, from any thread.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: reading and setting options is allowed at any time.
        let default = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(default, 1000, "mimalloc's option numbering changed");
        return_freed_memory_at_once();
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
            0
        );
    }
}
