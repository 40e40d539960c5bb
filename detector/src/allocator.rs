//! The allocator of the detector (and of the benches that measure it): mimalloc, told to give
//! freed memory back to the system after 10 ms instead of a second.
//!
//! Under memory bounds, networks of megabytes are evicted and restored all the time. When
//! networks were thousands of small allocations, returning freed pages at once kept peak RSS
//! lower (3,000 devices under a 500 MB budget: 734–752 MB against 858–869 MB with the default
//! second). Since a network is a few dozen large blocks, returning them at once makes every
//! restore fault its pages in again: 10,000 devices under 2000 MB spent half their time in the
//! kernel (374 records/s) at a delay of 0, against 1,500 records/s and the same peak RSS at
//! 10 ms, which lets churned memory be taken again while it is still mapped.
//! `MIMALLOC_PURGE_DELAY` (milliseconds) overrides it.

pub use mimalloc::MiMalloc;

/// `mi_option_purge_delay` in `mimalloc.h` (libmimalloc-sys does not name it); its default
/// in the bundled mimalloc 3, 1000 ms, is what the test below checks to catch a renumbering.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays mapped for reuse before it goes back to the system.
pub const PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Makes mimalloc return freed memory to the system after [`PURGE_DELAY_MS`], unless
/// `MIMALLOC_PURGE_DELAY` says otherwise (the trade: fewer page faults for more resident
/// memory). Call early in `main`.
pub fn return_freed_memory_soon() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting a mimalloc option is allowed at any time, from any thread.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) }
    }
}

/// Frees what the calling thread's heap holds for blocks other threads freed. Networks grow
/// on compute threads and are dropped on writer threads after an eviction; mimalloc settles
/// such frees only when the owning thread next allocates from the same pages, so a compute
/// thread keeps partly used pages mapped. Cheap when there is nothing to do.
pub fn collect_freed_by_other_threads() {
    // SAFETY: `mi_collect` may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(false) }
}

/// The resident set of this process in bytes (Linux `VmRSS`), if the system tells.
pub fn resident_bytes() -> Option<usize> {
    proc_status_bytes("VmRSS:")
}

/// The largest resident set of this process so far in bytes (Linux `VmHWM`), if known.
pub fn peak_resident_bytes() -> Option<usize> {
    proc_status_bytes("VmHWM:")
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn proc_status_bytes(field: &str) -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: reading and setting options is allowed at any time.
        let default = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(default, 1000, "mimalloc's option numbering changed");
        return_freed_memory_soon();
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
            PURGE_DELAY_MS
        );
    }

    #[test]
    fn resident_set_grows_with_touched_memory() {
        let before = resident_bytes().expect("Linux reports VmRSS");
        let block = std::hint::black_box(vec![1u8; 64 << 20]);
        let after = resident_bytes().unwrap();
        assert!(after >= before + (48 << 20), "{before} -> {after}");
        drop(block);
    }
}
