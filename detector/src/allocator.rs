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
//!
//! Networks live in a mimalloc heap of their own ([`in_network_heap`]): batch data (messages,
//! decoded records, outputs) lives for one batch, networks for many, and on shared pages a
//! page of freed batch data stays mapped for any network block left on it. 5,000 devices ×
//! 60 records under 600 MB peaked at 705 and 724 MiB with the networks' heap, 718 and 797
//! without (two runs each: runs of one configuration vary by ~100 MiB).

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use libmimalloc_sys as mi;
use mimalloc::MiMalloc;

/// mimalloc, except that allocations made in [`in_network_heap`] go to the networks' heap.
pub struct Allocator;

thread_local! {
    /// Whether this thread is building or computing a network.
    static IN_NETWORK: Cell<bool> = const { Cell::new(false) };
}

/// The networks' heap (a mimalloc first-class heap: any thread may allocate in it).
static NETWORK_HEAP: AtomicPtr<mi::mi_heap_t> = AtomicPtr::new(ptr::null_mut());

fn network_heap() -> *mut mi::mi_heap_t {
    let heap = NETWORK_HEAP.load(Ordering::Acquire);
    if !heap.is_null() {
        return heap;
    }
    // SAFETY: creating a heap has no preconditions.
    let new = unsafe { mi::mi_heap_new() };
    match NETWORK_HEAP.compare_exchange(ptr::null_mut(), new, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => new,
        Err(theirs) => {
            // SAFETY: `new` is empty and never shared.
            unsafe { mi::mi_heap_delete(new) };
            theirs
        }
    }
}

/// Runs `f` with this thread's allocations in the networks' heap: wrap whatever builds,
/// restores or grows a network (and nothing long-lived besides).
pub fn in_network_heap<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            IN_NETWORK.set(self.0);
        }
    }
    network_heap();
    let _restore = Restore(IN_NETWORK.replace(true));
    f()
}

/// The networks' heap if this thread is in [`in_network_heap`].
fn current_network_heap() -> Option<*mut mi::mi_heap_t> {
    // No destructor, so readable even while the thread exits.
    if IN_NETWORK.try_with(Cell::get).unwrap_or(false) {
        Some(NETWORK_HEAP.load(Ordering::Acquire)).filter(|h| !h.is_null())
    } else {
        None
    }
}

// SAFETY: blocks come from mimalloc with the layout's alignment; mimalloc frees and resizes
// a block of any of its heaps from any thread.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match current_network_heap() {
            Some(heap) => unsafe {
                mi::mi_heap_malloc_aligned(heap, layout.size(), layout.align()) as *mut u8
            },
            None => unsafe { MiMalloc.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match current_network_heap() {
            Some(heap) => unsafe {
                mi::mi_heap_zalloc_aligned(heap, layout.size(), layout.align()) as *mut u8
            },
            None => unsafe { MiMalloc.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match current_network_heap() {
            Some(heap) => unsafe {
                mi::mi_heap_realloc_aligned(heap, ptr as *mut c_void, new_size, layout.align())
                    as *mut u8
            },
            None => unsafe { MiMalloc.realloc(ptr, layout, new_size) },
        }
    }
}

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

/// The largest resident set between two looks, sampled by a thread of its own: the memory
/// bound is kept on the resident set's peaks, which come and go between batches and waves
/// (a batch's outputs, evicted networks not yet given back, checkpoints in flight).
pub struct ResidentPeak {
    peak: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl ResidentPeak {
    /// How often the resident set is sampled (a read of `/proc/self/status`, ~20 µs).
    pub const EVERY: Duration = Duration::from_millis(10);

    /// Starts sampling; `None` where the system does not report the resident set.
    pub fn start() -> Option<Self> {
        let peak = Arc::new(AtomicUsize::new(resident_bytes()?));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::Builder::new()
                .name("rss-sampler".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(now) = resident_bytes() {
                            peak.fetch_max(now, Ordering::Relaxed);
                        }
                        std::thread::sleep(Self::EVERY);
                    }
                })
                .ok()?
        };
        Some(ResidentPeak {
            peak,
            stop,
            sampler: Some(sampler),
        })
    }

    /// The largest resident set sampled since the last call (or the start), the present one
    /// included; the next call starts from the present one.
    pub fn take(&self) -> usize {
        let now = resident_bytes().unwrap_or(0);
        self.peak.swap(now, Ordering::Relaxed).max(now)
    }
}

impl Drop for ResidentPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sampler) = self.sampler.take() {
            let _ = sampler.join();
        }
    }
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

    extern "C" {
        // In mimalloc 3, not bound by libmimalloc-sys.
        fn mi_heap_contains(heap: *const mi::mi_heap_t, p: *const c_void) -> bool;
    }

    fn in_networks_heap(p: *mut u8) -> bool {
        unsafe { mi_heap_contains(network_heap(), p as *const c_void) }
    }

    #[test]
    fn blocks_allocated_for_networks_live_apart_from_the_rest() {
        let small = Layout::from_size_align(48, 8).unwrap();
        let page = Layout::from_size_align(4096, 64).unwrap();
        unsafe {
            let before = Allocator.alloc(small);
            let network = in_network_heap(|| Allocator.alloc(small));
            let zeroed = in_network_heap(|| Allocator.alloc_zeroed(page));
            let after = Allocator.alloc(small);
            assert!(!in_networks_heap(before) && !in_networks_heap(after));
            assert!(in_networks_heap(network) && in_networks_heap(zeroed));
            assert!(std::slice::from_raw_parts(zeroed, 4096)
                .iter()
                .all(|&b| b == 0));
            // A block grown for a network moves to the networks' heap, contents kept.
            before.write_bytes(7, 48);
            let grown = in_network_heap(|| Allocator.realloc(before, small, 1 << 20));
            assert!(in_networks_heap(grown));
            assert!(std::slice::from_raw_parts(grown, 48)
                .iter()
                .all(|&b| b == 7));
            assert_eq!(grown as usize % 8, 0);
            let aligned = in_network_heap(|| Allocator.realloc(zeroed, page, 1 << 16));
            assert_eq!(aligned as usize % 64, 0);
            // The scope ends even when its work panics.
            let _ = std::panic::catch_unwind(|| in_network_heap(|| panic!("inside")));
            let later = Allocator.alloc(small);
            assert!(!in_networks_heap(later));
            for (p, l) in [
                (network, small),
                (aligned, Layout::from_size_align(1 << 16, 64).unwrap()),
                (after, small),
                (grown, Layout::from_size_align(1 << 20, 8).unwrap()),
                (later, small),
            ] {
                Allocator.dealloc(p, l);
            }
        }
    }

    /// Held by tests that measure the resident set, so that they do not see each other's blocks.
    static RESIDENT_SET: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn the_resident_peak_between_two_looks_includes_memory_already_freed() {
        let _alone = RESIDENT_SET.lock().unwrap_or_else(|e| e.into_inner());
        let peak = ResidentPeak::start().expect("Linux reports VmRSS");
        let start = peak.take();
        let block = std::hint::black_box(vec![1u8; 64 << 20]);
        std::thread::sleep(ResidentPeak::EVERY * 5);
        drop(block);
        let freed = resident_bytes().unwrap();
        let seen = peak.take();
        assert!(seen >= start + (48 << 20), "{start} -> {seen}");
        assert!(seen >= freed + (48 << 20), "freed {freed}, peak {seen}");
        // The next look starts from the present.
        assert!(peak.take() < seen - (32 << 20));
    }

    #[test]
    fn resident_set_grows_with_touched_memory() {
        let _alone = RESIDENT_SET.lock().unwrap_or_else(|e| e.into_inner());
        let before = resident_bytes().expect("Linux reports VmRSS");
        let block = std::hint::black_box(vec![1u8; 64 << 20]);
        let after = resident_bytes().unwrap();
        assert!(after >= before + (48 << 20), "{before} -> {after}");
        drop(block);
    }
}
