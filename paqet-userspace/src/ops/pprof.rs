//! CPU and heap profiles in pprof format (gzip-compressed protobuf, as Go's `net/http/pprof` serves them).
//!
//! - CPU: [`cpu_profile`] samples every thread at 99 Hz with the `pprof` crate (SIGPROF + unwinding).
//! - Heap: [`TrackingAlloc`] wraps the system allocator. The binary installs it with `#[global_allocator]`.
//!   Like Go's `MemProfileRate`, it samples one allocation about every [`DEFAULT_SAMPLE_RATE`] bytes
//!   (exponentially distributed intervals, per thread), records the sampled allocation's stack in a
//!   fixed-size bucket table, and remembers the sampled pointer until it is freed. An allocation that is not
//!   sampled costs one thread-local subtraction; a free costs one relaxed atomic load of a hint counter.
//!   The tables are static (no allocation inside the allocator) and guarded by a mutex that is only taken for
//!   sampled allocations and frees of (probably) sampled pointers. [`heap_profile`] encodes the buckets with
//!   the sample types `alloc_objects/count`, `alloc_space/bytes`, `inuse_objects/count`, `inuse_space/bytes`,
//!   scaled to estimate the unsampled totals as Go does.
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flate2::write::GzEncoder;
use flate2::Compression;
use pprof::protos::{self, Message};

/// CPU sampling frequency (Hz), as Go's profiler.
pub const CPU_FREQUENCY_HZ: i32 = 99;
/// Longest CPU profile accepted (seconds).
pub const MAX_CPU_SECONDS: u64 = 60;
/// Mean bytes between two heap samples (Go's default `MemProfileRate`).
pub const DEFAULT_SAMPLE_RATE: usize = 512 * 1024;

/// A profile could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("profile duration {0} s is out of range 1..={MAX_CPU_SECONDS}")]
    BadSeconds(u64),
    #[error("a CPU profile is already being taken")]
    Busy,
    #[error("CPU profiler: {0}")]
    Profiler(#[from] pprof::Error),
    #[error("compressing the profile: {0}")]
    Compress(#[from] std::io::Error),
}

/// Gzip-compresses `data` (the encoding Go's pprof handlers use).
pub fn gzip(data: &[u8]) -> Result<Vec<u8>, std::io::Error> {
    let mut enc = GzEncoder::new(
        Vec::with_capacity(data.len() / 2 + 64),
        Compression::default(),
    );
    enc.write_all(data)?;
    enc.finish()
}

static CPU_BUSY: AtomicBool = AtomicBool::new(false);

/// Clears [`CPU_BUSY`] when dropped.
struct CpuBusy;
impl Drop for CpuBusy {
    fn drop(&mut self) {
        CPU_BUSY.store(false, Ordering::Release);
    }
}

/// Profiles the whole process's CPU for `seconds` (1..=60) and returns the `Profile` protobuf.
/// Blocks the calling thread for the duration; only one profile runs at a time ([`ProfileError::Busy`]).
pub fn cpu_profile_proto(seconds: u64) -> Result<protos::Profile, ProfileError> {
    if !(1..=MAX_CPU_SECONDS).contains(&seconds) {
        return Err(ProfileError::BadSeconds(seconds));
    }
    if CPU_BUSY.swap(true, Ordering::AcqRel) {
        return Err(ProfileError::Busy);
    }
    let _busy = CpuBusy;
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(CPU_FREQUENCY_HZ)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()?;
    std::thread::sleep(Duration::from_secs(seconds));
    let report = guard.report().build()?;
    drop(guard);
    Ok(report.pprof()?)
}

/// [`cpu_profile_proto`], encoded and gzip-compressed.
pub fn cpu_profile(seconds: u64) -> Result<Vec<u8>, ProfileError> {
    let p = cpu_profile_proto(seconds)?;
    Ok(gzip(&p.encode_to_vec())?)
}

// ---------------------------------------------------------------------------------------------------------
// Heap sampling allocator
// ---------------------------------------------------------------------------------------------------------

/// Frames kept per sampled stack.
const MAX_DEPTH: usize = 32;
/// Distinct stacks (bucket 0 collects samples once the table is 3/4 full).
const BUCKETS: usize = 2048;
/// Live sampled allocations tracked at once (power of two).
const LIVE: usize = 16384;
/// Hint counters (power of two): how many live sampled pointers hash to each slot.
const HINTS: usize = 65536;

static SAMPLE_RATE: AtomicUsize = AtomicUsize::new(DEFAULT_SAMPLE_RATE);
static INSTALLED: AtomicBool = AtomicBool::new(false);
static HINT: [AtomicU16; HINTS] = [const { AtomicU16::new(0) }; HINTS];
static TABLES: Mutex<Tables> = Mutex::new(Tables::EMPTY);

thread_local! {
    /// Bytes left before this thread's next sample.
    static LEFT: Cell<i64> = const { Cell::new(DEFAULT_SAMPLE_RATE as i64) };
    /// xorshift state for the sampling intervals.
    static RNG: Cell<u64> = const { Cell::new(0) };
    /// Set while this thread records a sample (allocations made meanwhile are not sampled).
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Sets the mean bytes between heap samples; 0 stops sampling (threads notice within one interval).
pub fn set_heap_sample_rate(bytes: usize) {
    SAMPLE_RATE.store(bytes, Ordering::Relaxed);
}

/// The mean bytes between heap samples (0: off).
pub fn heap_sample_rate() -> usize {
    SAMPLE_RATE.load(Ordering::Relaxed)
}

/// Whether [`TrackingAlloc`] is the global allocator (it has sampled at least one allocation).
pub fn heap_tracking_installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

#[derive(Clone, Copy)]
struct Bucket {
    hash: u64,
    depth: u32,
    stack: [usize; MAX_DEPTH],
    allocs: u64,
    alloc_bytes: u64,
    frees: u64,
    free_bytes: u64,
}

impl Bucket {
    const EMPTY: Bucket = Bucket {
        hash: 0,
        depth: 0,
        stack: [0; MAX_DEPTH],
        allocs: 0,
        alloc_bytes: 0,
        frees: 0,
        free_bytes: 0,
    };
}

#[derive(Clone, Copy)]
struct LiveEntry {
    /// 0: empty slot.
    ptr: usize,
    size: usize,
    bucket: u32,
}

struct Tables {
    buckets: [Bucket; BUCKETS],
    buckets_used: usize,
    live: [LiveEntry; LIVE],
    live_count: usize,
}

impl Tables {
    const EMPTY: Tables = Tables {
        buckets: [Bucket::EMPTY; BUCKETS],
        buckets_used: 0,
        live: [LiveEntry {
            ptr: 0,
            size: 0,
            bucket: 0,
        }; LIVE],
        live_count: 0,
    };

    /// The bucket of `stack` (created if new; bucket 0 when the table is full).
    fn bucket_for(&mut self, stack: &[usize]) -> usize {
        let hash = stack_hash(stack);
        let mut i = 1 + (hash as usize) % (BUCKETS - 1);
        loop {
            let b = &mut self.buckets[i];
            if b.allocs == 0 {
                if self.buckets_used >= BUCKETS * 3 / 4 {
                    return 0;
                }
                b.hash = hash;
                b.depth = stack.len() as u32;
                b.stack[..stack.len()].copy_from_slice(stack);
                self.buckets_used += 1;
                return i;
            }
            if b.hash == hash && &b.stack[..b.depth as usize] == stack {
                return i;
            }
            i = if i + 1 == BUCKETS { 1 } else { i + 1 };
        }
    }

    fn insert_live(&mut self, ptr: usize, size: usize, bucket: usize) -> bool {
        if self.live_count >= LIVE * 3 / 4 {
            return false;
        }
        let mut i = live_slot(ptr);
        while self.live[i].ptr != 0 {
            i = (i + 1) & (LIVE - 1);
        }
        self.live[i] = LiveEntry {
            ptr,
            size,
            bucket: bucket as u32,
        };
        self.live_count += 1;
        true
    }

    /// Removes `ptr` (linear probing with backward-shift deletion); returns its entry.
    fn remove_live(&mut self, ptr: usize) -> Option<LiveEntry> {
        let mut i = live_slot(ptr);
        loop {
            let e = self.live[i];
            if e.ptr == 0 {
                return None;
            }
            if e.ptr == ptr {
                break;
            }
            i = (i + 1) & (LIVE - 1);
        }
        let found = self.live[i];
        let mut hole = i;
        let mut j = (i + 1) & (LIVE - 1);
        while self.live[j].ptr != 0 {
            let home = live_slot(self.live[j].ptr);
            // Move j into the hole unless its home lies cyclically in (hole, j].
            let dist_home = j.wrapping_sub(home) & (LIVE - 1);
            let dist_hole = j.wrapping_sub(hole) & (LIVE - 1);
            if dist_home >= dist_hole {
                self.live[hole] = self.live[j];
                hole = j;
            }
            j = (j + 1) & (LIVE - 1);
        }
        self.live[hole] = LiveEntry {
            ptr: 0,
            size: 0,
            bucket: 0,
        };
        self.live_count -= 1;
        Some(found)
    }
}

fn stack_hash(stack: &[usize]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &a in stack {
        h = (h ^ a as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h | 1
}

fn mix(ptr: usize) -> u64 {
    (ptr as u64 >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn live_slot(ptr: usize) -> usize {
    (mix(ptr) >> 40) as usize & (LIVE - 1)
}

fn hint_slot(ptr: usize) -> usize {
    (mix(ptr) >> 20) as usize & (HINTS - 1)
}

/// Next sampling interval: exponential with mean `rate` (so sampling is unbiased by allocation size).
fn next_interval(rate: usize) -> i64 {
    let mut x = RNG.with(|r| r.get());
    if x == 0 {
        // Seed from the thread-local's address and the clock; no allocation.
        let seed = RNG.with(|r| r as *const Cell<u64> as u64);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        x = (seed ^ t.rotate_left(17)) | 1;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    RNG.with(|r| r.set(x));
    // Uniform in (0, 1].
    let u = ((x >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let v = -u.ln() * rate as f64;
    (v as i64).max(1)
}

#[inline]
fn note_alloc(ptr: *mut u8, size: usize) {
    let sample = LEFT
        .try_with(|left| {
            let l = left.get() - size as i64;
            left.set(l);
            l <= 0
        })
        .unwrap_or(false);
    if sample {
        sample_alloc(ptr as usize, size);
    }
}

#[cold]
#[inline(never)]
fn sample_alloc(ptr: usize, size: usize) {
    if BUSY.try_with(|b| b.replace(true)).unwrap_or(true) {
        // Re-entered from inside a sample (or TLS is gone): do not sample; try again after a while.
        let _ = LEFT.try_with(|l| l.set(DEFAULT_SAMPLE_RATE as i64));
        return;
    }
    INSTALLED.store(true, Ordering::Relaxed);
    let rate = SAMPLE_RATE.load(Ordering::Relaxed);
    if rate == 0 {
        let _ = LEFT.try_with(|l| l.set(DEFAULT_SAMPLE_RATE as i64));
    } else {
        let next = next_interval(rate);
        let _ = LEFT.try_with(|l| l.set(next));
        let mut stack = [0usize; MAX_DEPTH];
        let mut n = 0;
        // SAFETY: the callback only writes into a local array; allocations the unwinder may make are not
        // sampled (BUSY is set) and go straight to the system allocator.
        unsafe {
            backtrace::trace_unsynchronized(|f| {
                stack[n] = f.ip() as usize;
                n += 1;
                n < MAX_DEPTH
            });
        }
        let mut t = TABLES.lock().unwrap_or_else(|e| e.into_inner());
        let b = t.bucket_for(&stack[..n]);
        t.buckets[b].allocs += 1;
        t.buckets[b].alloc_bytes += size as u64;
        if t.insert_live(ptr, size, b) {
            HINT[hint_slot(ptr)].fetch_add(1, Ordering::Relaxed);
        }
    }
    let _ = BUSY.try_with(|b| b.set(false));
}

#[inline]
fn note_free(ptr: *mut u8) {
    let h = hint_slot(ptr as usize);
    if HINT[h].load(Ordering::Relaxed) != 0 {
        free_sampled(ptr as usize, h);
    }
}

#[cold]
#[inline(never)]
fn free_sampled(ptr: usize, hint: usize) {
    let mut t = TABLES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = t.remove_live(ptr) {
        HINT[hint].fetch_sub(1, Ordering::Relaxed);
        let b = &mut t.buckets[e.bucket as usize];
        b.frees += 1;
        b.free_bytes += e.size as u64;
    }
}

/// The sampling heap-profiler allocator. Install in the binary with
/// `#[global_allocator] static ALLOC: paqet::ops::pprof::TrackingAlloc = paqet::ops::pprof::TrackingAlloc;`.
pub struct TrackingAlloc;

// SAFETY: every call is forwarded to `System` unchanged; the bookkeeping never touches the returned memory.
unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note_alloc(p, layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note_alloc(p, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(ptr);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Forget the old block before it is released: once freed, another thread may get (and sample) the
        // same address. (If realloc fails the old block stays live but untracked: a harmless undercount.)
        note_free(ptr);
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note_alloc(p, new_size);
        }
        p
    }
}

/// One stack's heap figures (raw sampled counts, not yet scaled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeapBucket {
    /// Return addresses, innermost first (empty for the overflow bucket).
    pub stack: Vec<usize>,
    pub allocs: u64,
    pub alloc_bytes: u64,
    pub frees: u64,
    pub free_bytes: u64,
}

/// The sampled heap buckets recorded so far.
pub fn heap_buckets() -> Vec<HeapBucket> {
    // Copy out under the lock into a buffer allocated before it (no allocation or free while locked).
    let mut raw: Vec<Bucket> = Vec::with_capacity(BUCKETS);
    {
        let t = TABLES.lock().unwrap_or_else(|e| e.into_inner());
        raw.extend(t.buckets.iter().filter(|b| b.allocs > 0).copied());
    }
    raw.iter()
        .map(|b| HeapBucket {
            stack: b.stack[..b.depth as usize].to_vec(),
            allocs: b.allocs,
            alloc_bytes: b.alloc_bytes,
            frees: b.frees,
            free_bytes: b.free_bytes,
        })
        .collect()
}

/// Go's unbiasing of sampled (count, bytes) at mean interval `rate`.
fn scale(count: u64, bytes: u64, rate: usize) -> (i64, i64) {
    if count == 0 || rate == 0 {
        return (count as i64, bytes as i64);
    }
    let avg = bytes as f64 / count as f64;
    let f = 1.0 / (1.0 - (-avg / rate as f64).exp());
    ((count as f64 * f) as i64, (bytes as f64 * f) as i64)
}

/// Builds a pprof `Profile` (symbolized), string table and ids as the format requires.
struct ProfileBuilder {
    p: protos::Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(i64, i64), u64>,
    locations: HashMap<usize, u64>,
}

impl ProfileBuilder {
    fn new() -> Self {
        let mut b = ProfileBuilder {
            p: protos::Profile::default(),
            strings: HashMap::new(),
            functions: HashMap::new(),
            locations: HashMap::new(),
        };
        b.s("");
        b
    }

    fn s(&mut self, v: &str) -> i64 {
        if let Some(&i) = self.strings.get(v) {
            return i;
        }
        let i = self.p.string_table.len() as i64;
        self.p.string_table.push(v.to_string());
        self.strings.insert(v.to_string(), i);
        i
    }

    fn value_type(&mut self, ty: &str, unit: &str) -> protos::ValueType {
        protos::ValueType {
            ty: self.s(ty),
            unit: self.s(unit),
        }
    }

    fn function(&mut self, name: &str, file: &str, line: i64) -> u64 {
        let (n, f) = (self.s(name), self.s(file));
        if let Some(&id) = self.functions.get(&(n, f)) {
            return id;
        }
        let id = self.p.function.len() as u64 + 1;
        self.p.function.push(protos::Function {
            id,
            name: n,
            system_name: n,
            filename: f,
            start_line: line,
        });
        self.functions.insert((n, f), id);
        id
    }

    /// The location id of return address `addr`, symbolized (inlined frames innermost first).
    fn location(&mut self, addr: usize) -> u64 {
        if let Some(&id) = self.locations.get(&addr) {
            return id;
        }
        let mut frames: Vec<(String, String, i64)> = Vec::new();
        backtrace::resolve(addr as *mut std::ffi::c_void, |sym| {
            let name = sym
                .name()
                .map(|n| format!("{n:#}"))
                .unwrap_or_else(|| format!("{addr:#x}"));
            let file = sym
                .filename()
                .map(|f| f.display().to_string())
                .unwrap_or_default();
            frames.push((name, file, i64::from(sym.lineno().unwrap_or(0))));
        });
        if frames.is_empty() {
            frames.push((format!("{addr:#x}"), String::new(), 0));
        }
        let line = frames
            .iter()
            .map(|(n, f, l)| protos::Line {
                function_id: self.function(n, f, *l),
                line: *l,
            })
            .collect();
        let id = self.p.location.len() as u64 + 1;
        self.p.location.push(protos::Location {
            id,
            mapping_id: 0,
            address: addr as u64,
            line,
            is_folded: false,
        });
        self.locations.insert(addr, id);
        id
    }

    fn overflow_location(&mut self) -> u64 {
        const KEY: usize = 0;
        if let Some(&id) = self.locations.get(&KEY) {
            return id;
        }
        let f = self.function("[heap profile bucket table full]", "", 0);
        let id = self.p.location.len() as u64 + 1;
        self.p.location.push(protos::Location {
            id,
            mapping_id: 0,
            address: 0,
            line: vec![protos::Line {
                function_id: f,
                line: 0,
            }],
            is_folded: false,
        });
        self.locations.insert(KEY, id);
        id
    }
}

/// The heap profile as a pprof `Profile` (sample types alloc_objects, alloc_space, inuse_objects,
/// inuse_space; default inuse_space). Empty (but well-formed) when [`TrackingAlloc`] is not installed.
pub fn heap_profile_proto() -> protos::Profile {
    let rate = heap_sample_rate();
    let buckets = heap_buckets();
    let mut b = ProfileBuilder::new();
    b.p.sample_type = vec![
        b.value_type("alloc_objects", "count"),
        b.value_type("alloc_space", "bytes"),
        b.value_type("inuse_objects", "count"),
        b.value_type("inuse_space", "bytes"),
    ];
    b.p.period_type = Some(b.value_type("space", "bytes"));
    b.p.period = rate as i64;
    b.p.default_sample_type = b.s("inuse_space");
    b.p.time_nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    for hb in &buckets {
        let location_id: Vec<u64> = if hb.stack.is_empty() {
            vec![b.overflow_location()]
        } else {
            hb.stack.iter().map(|&a| b.location(a)).collect()
        };
        let (ao, ab) = scale(hb.allocs, hb.alloc_bytes, rate);
        let (io, ib) = scale(
            hb.allocs - hb.frees.min(hb.allocs),
            hb.alloc_bytes - hb.free_bytes.min(hb.alloc_bytes),
            rate,
        );
        b.p.sample.push(protos::Sample {
            location_id,
            value: vec![ao, ab, io, ib],
            label: Vec::new(),
        });
    }
    if !heap_tracking_installed() {
        let c = b.s("heap tracking is off: the binary does not use ops::pprof::TrackingAlloc");
        b.p.comment.push(c);
    }
    b.p
}

/// [`heap_profile_proto`], encoded and gzip-compressed.
pub fn heap_profile() -> Result<Vec<u8>, ProfileError> {
    Ok(gzip(&heap_profile_proto().encode_to_vec())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heap-allocated empty table (too big for a test thread's stack).
    fn empty_tables() -> Box<Tables> {
        // SAFETY: all-zero bytes are `Tables::EMPTY` (integers and arrays of integers only).
        unsafe { Box::<Tables>::new_zeroed().assume_init() }
    }

    #[test]
    fn live_table_insert_remove_keeps_probe_chains() {
        let mut t = empty_tables();
        // Ordinary pointers, plus runs that share one home slot (one of them the last slot, so the probe
        // chain wraps around).
        let base = 0x1000usize;
        let mut ptrs: Vec<usize> = (0..200).map(|i| base + i * 16).collect();
        for home in [live_slot(base), LIVE - 1] {
            let same: Vec<usize> = (0..4_000_000usize)
                .map(|i| 0x10_0000 + i * 16)
                .filter(|&p| live_slot(p) == home)
                .take(12)
                .collect();
            assert!(
                same.len() >= 4,
                "found only {} colliding pointers",
                same.len()
            );
            ptrs.extend(same);
        }
        for (i, &p) in ptrs.iter().enumerate() {
            assert!(t.insert_live(p, i + 1, 1));
        }
        // Remove every other pointer, then every remaining one must still be found.
        for &p in ptrs.iter().step_by(2) {
            assert!(t.remove_live(p).is_some(), "{p:#x} not found");
        }
        for &p in ptrs.iter().step_by(2) {
            assert!(t.remove_live(p).is_none(), "{p:#x} removed twice");
        }
        for (i, &p) in ptrs.iter().enumerate().skip(1).step_by(2) {
            assert_eq!(t.remove_live(p).map(|e| e.size), Some(i + 1), "{p:#x}");
        }
        assert_eq!(t.live_count, 0);
    }

    #[test]
    fn buckets_dedupe_stacks_and_overflow_to_zero() {
        let mut t = empty_tables();
        let a = t.bucket_for(&[1, 2, 3]);
        t.buckets[a].allocs = 1;
        assert_eq!(t.bucket_for(&[1, 2, 3]), a);
        assert_ne!(t.bucket_for(&[1, 2, 4]), a);
        for i in 0..BUCKETS {
            let b = t.bucket_for(&[10, i]);
            t.buckets[b].allocs += 1;
        }
        assert_eq!(t.bucket_for(&[99, 99]), 0);
    }

    #[test]
    fn scaling_estimates_unsampled_allocations() {
        // A huge allocation is always sampled: weight ~1.
        assert_eq!(scale(1, 64 << 20, DEFAULT_SAMPLE_RATE).0, 1);
        // Small allocations stand for many.
        let (n, _) = scale(1, 64, DEFAULT_SAMPLE_RATE);
        assert!(n > 1000, "{n}");
    }

    #[test]
    fn bad_cpu_durations_are_refused() {
        assert!(matches!(
            cpu_profile_proto(0),
            Err(ProfileError::BadSeconds(0))
        ));
        assert!(matches!(
            cpu_profile_proto(61),
            Err(ProfileError::BadSeconds(61))
        ));
    }
}
