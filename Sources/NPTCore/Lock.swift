#if NPTKIT_TSAN_LOCKS
#if canImport(Glibc)
import Glibc
#endif

/// ThreadSanitizer builds (`-Xswiftc -DNPTKIT_TSAN_LOCKS`, scripts/sanitize.sh): a lock with the
/// API of `Synchronization.Mutex` over a pthread mutex, which ThreadSanitizer understands.
/// TSan reports false races inside `Synchronization.Mutex` on Linux (its futex word is not a
/// synchronization TSan models), which would hide the real ones; every other build uses `Mutex`.
package struct NPTMutex<Value: ~Copyable>: ~Copyable, @unchecked Sendable {
    private final class Box {
        let mutex: UnsafeMutablePointer<pthread_mutex_t>
        var value: Value
        init(_ v: consuming Value) {
            value = v
            mutex = .allocate(capacity: 1)
            pthread_mutex_init(mutex, nil)
        }
        deinit { pthread_mutex_destroy(mutex); mutex.deallocate() }
    }
    private let box: Box

    package init(_ initialValue: consuming sending Value) { box = Box(initialValue) }

    package borrowing func withLock<Result: ~Copyable, E: Error>(
        _ body: (inout sending Value) throws(E) -> sending Result
    ) throws(E) -> sending Result {
        pthread_mutex_lock(box.mutex)
        defer { pthread_mutex_unlock(box.mutex) }
        return try body(&box.value)
    }
}
#else
import Synchronization

/// `Synchronization.Mutex`; in ThreadSanitizer builds a pthread mutex with the same API (above).
package typealias NPTMutex<Value: ~Copyable> = Mutex<Value>
#endif

/// The life of an object that calls on other threads may race with its destroy (a VM, a context):
/// calls that need the object hold a lease; a destroy closes it (new calls are refused), waits for
/// the leases in flight, and then either completes or reopens it: all or nothing, exactly once.
///
/// - A call while the object is alive takes a lease; while a destroy is in progress it is refused
///   with `.busy` (it does not wait: a call made from inside a lease must never wait for its own
///   destroy); once destroyed, with `.badHandle`.
/// - `beginClose` lets exactly one destroyer through at a time: a second one waits for the first's
///   outcome and then sees the object destroyed (`.badHandle`) or alive (it tries itself).
package final class Lifetime: @unchecked Sendable {
    package enum State: Sendable { case alive, closing, closed }
    private let monitor = Monitor()
    private var state = State.alive
    private var uses = 0
    private let what: String

    package init(_ what: String) { self.what = what }

    package var current: State { monitor.withLock { state } }

    package func enter() throws(NPTError) {
        monitor.lock()
        defer { monitor.unlock() }
        switch state {
        case .alive: uses += 1
        case .closing: throw NPTError(.busy, "\(what) is being destroyed by another thread")
        case .closed: throw NPTError(.badHandle, "\(what) is destroyed")
        }
    }

    package func leave() {
        monitor.lock()
        uses -= 1
        if uses == 0 { monitor.broadcast() }
        monitor.unlock()
    }

    /// Runs `body` holding a lease.
    package func withLease<T>(_ body: () throws(NPTError) -> T) throws(NPTError) -> T {
        try enter()
        defer { leave() }
        return try body()
    }

    /// Starts a destroy: waits until no lease is in flight (at most `timeoutNanos`, then `.busy`
    /// and the object stays alive). On success the caller must end with `finishClose` or
    /// `cancelClose`.
    package func beginClose(timeoutNanos: UInt64) throws(NPTError) {
        monitor.lock()
        defer { monitor.unlock() }
        while state == .closing { monitor.wait(untilNanos: nil) }
        if state == .closed { throw NPTError(.badHandle, "\(what) is destroyed") }
        state = .closing
        let deadline = Monitor.deadline(after: timeoutNanos)
        while uses > 0 {
            if !monitor.wait(untilNanos: deadline) && uses > 0 && Monitor.now() >= deadline {
                state = .alive
                monitor.broadcast()
                throw NPTError(.busy, "\(what) is in use by \(uses) call(s) on other threads that did not return within \(timeoutNanos / 1_000_000) ms; nothing was destroyed")
            }
        }
    }

    /// The destroy failed: the object is alive again, as before.
    package func cancelClose() {
        monitor.withLock { state = .alive; monitor.broadcast() }
    }

    /// The destroy completed.
    package func finishClose() {
        monitor.withLock { state = .closed; monitor.broadcast() }
    }
}
