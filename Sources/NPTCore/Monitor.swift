#if canImport(Glibc)
import Glibc
#endif

/// A mutex with a condition variable (the toolchain's Synchronization module has a Mutex but no
/// condition variable; parked vCPU threads need one).
package final class Monitor: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>

    package init() {
        mutex = .allocate(capacity: 1)
        cond = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond); pthread_mutex_destroy(mutex)
        mutex.deallocate(); cond.deallocate()
    }

    /// A further condition variable on the same mutex (to wake one waiter instead of all).
    package final class Condition: @unchecked Sendable {
        let cond: UnsafeMutablePointer<pthread_cond_t>
        init() {
            cond = .allocate(capacity: 1)
            var attr = pthread_condattr_t()
            pthread_condattr_init(&attr)
            pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
            pthread_cond_init(cond, &attr)
            pthread_condattr_destroy(&attr)
        }
        deinit { pthread_cond_destroy(cond); cond.deallocate() }
        package func signal() { pthread_cond_signal(cond) }
    }
    package func makeCondition() -> Condition { Condition() }

    /// Waits on `c` (the lock held) until signalled or `deadline`; false on timeout.
    @discardableResult
    package func wait(on c: Condition, untilNanos deadline: UInt64?) -> Bool {
        guard let deadline, deadline != .max else { pthread_cond_wait(c.cond, mutex); return true }
        var ts = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
        return pthread_cond_timedwait(c.cond, mutex, &ts) == 0
    }

    package func lock() { pthread_mutex_lock(mutex) }
    package func unlock() { pthread_mutex_unlock(mutex) }
    package func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        lock(); defer { unlock() }
        return try body()
    }
    /// Wakes every waiter.
    package func broadcast() { pthread_cond_broadcast(cond) }
    /// Waits (the lock held) until woken or until `deadline` (monotonic nanoseconds); false on timeout.
    @discardableResult
    package func wait(untilNanos deadline: UInt64?) -> Bool {
        guard let deadline, deadline != .max else { pthread_cond_wait(cond, mutex); return true }
        var ts = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
        return pthread_cond_timedwait(cond, mutex, &ts) == 0
    }

    /// `now() + nanos`, saturating (a bound of UInt64.max means "no bound", never an overflow).
    package static func deadline(after nanos: UInt64) -> UInt64 {
        let (d, o) = now().addingReportingOverflow(nanos)
        return o ? .max : d
    }

    /// Monotonic time in nanoseconds.
    package static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}
