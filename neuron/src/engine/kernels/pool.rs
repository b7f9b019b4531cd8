//! Persistent worker threads that help with a product when they are awake, and that the caller
//! never waits for unless they hold one of its tasks.
//!
//! candle's barrier pool (and llama.cpp's) make the caller wait until every worker has checked
//! in. On a host whose cores are shared (CI, the 2-core dev machines), a worker that is not
//! scheduled holds up every product by a scheduler tick: in a profile of decode under load, 85% of
//! the time went to that wait. Here tasks are claimed from a counter; the caller takes whatever
//! nobody else has, then waits only for tasks already running elsewhere.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps: long enough to bridge the non-matmul work
/// between two products of one forward pass, short enough not to burn a shared core for long.
const SPIN: Duration = Duration::from_micros(200);

struct Job {
    run: unsafe fn(*const (), usize),
    data: *const (),
    tasks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
}

impl Job {
    /// Claims and runs tasks until none are left.
    ///
    /// # Safety
    /// `data` must still point at the closure `run` was made for.
    unsafe fn work(&self) {
        loop {
            let t = self.next.fetch_add(1, SeqCst);
            if t >= self.tasks {
                return;
            }
            // SAFETY: forwarded from the caller.
            unsafe { (self.run)(self.data, t) };
            self.done.fetch_add(1, SeqCst);
        }
    }
}

struct Shared {
    job: AtomicPtr<Job>,
    /// Bumped on every publish, so a worker joins each job once.
    epoch: AtomicUsize,
    /// Workers between reading `job` and leaving it: the caller waits for zero before its job
    /// (on its stack) goes away.
    active: AtomicUsize,
    sleeping: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// One job at a time; a second caller runs its tasks alone.
    busy: Mutex<()>,
}

struct Pool {
    shared: &'static Shared,
    workers: usize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            busy: Mutex::new(()),
        }));
        // Same count as candle's pools: RAYON_NUM_THREADS, else the physical cores.
        let workers = candle_core::utils::get_num_threads().saturating_sub(1);
        for i in 0..workers {
            std::thread::Builder::new()
                .name(format!("cortex-kernel-{i}"))
                .spawn(move || worker(shared))
                .expect("spawning a kernel worker thread");
        }
        Pool { shared, workers }
    })
}

fn worker(s: &'static Shared) {
    let mut seen = s.epoch.load(SeqCst);
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(SeqCst) == seen {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleeping.fetch_add(1, SeqCst);
            while s.epoch.load(SeqCst) == seen {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleeping.fetch_sub(1, SeqCst);
        }
        seen = s.epoch.load(SeqCst);
        s.active.fetch_add(1, SeqCst);
        let job = s.job.load(SeqCst);
        if !job.is_null() {
            // SAFETY: the publisher keeps the job alive until `active` is back to zero.
            unsafe { (*job).work() };
        }
        s.active.fetch_sub(1, SeqCst);
    }
}

/// Threads a product runs on: the workers and the caller. Read once: candle's count reads
/// `/proc/cpuinfo` on every call when `RAYON_NUM_THREADS` is unset, tens of microseconds that
/// every product of every token paid.
pub fn threads() -> usize {
    pool().workers + 1
}

/// Calls `f(0..tasks)` once per task, over the pool and the calling thread.
pub fn run<F: Fn(usize) + Sync>(tasks: usize, f: F) {
    let p = pool();
    let guard = if tasks > 1 && p.workers > 0 {
        p.shared.busy.try_lock().ok()
    } else {
        None
    };
    let Some(_guard) = guard else {
        (0..tasks).for_each(f);
        return;
    };
    unsafe fn call<F: Fn(usize)>(data: *const (), t: usize) {
        // SAFETY: `data` is the `&F` published below, alive until `run` returns.
        unsafe { (*data.cast::<F>())(t) }
    }
    let job = Job {
        run: call::<F>,
        data: (&f as *const F).cast(),
        tasks,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
    };
    let s = p.shared;
    s.job.store((&job as *const Job).cast_mut(), SeqCst);
    s.epoch.fetch_add(1, SeqCst);
    if s.sleeping.load(SeqCst) > 0 {
        let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
        s.wake.notify_all();
    }
    // SAFETY: `f` outlives this call.
    unsafe { job.work() };
    while job.done.load(SeqCst) < tasks {
        std::hint::spin_loop();
    }
    s.job.store(std::ptr::null_mut(), SeqCst);
    // A worker that read the pointer before it was cleared may still look at `job`.
    while s.active.load(SeqCst) != 0 {
        std::hint::spin_loop();
    }
}
