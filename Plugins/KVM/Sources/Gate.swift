// The per-VM layout gate: a vCPU enters KVM_RUN only while the installed memslot layout is the one
// its exposed hierarchy needs.
//
// Memslots belong to the whole VM (this KVM has no multiple address spaces), so two vCPUs in
// different hierarchies cannot run at the same time. The gate keeps, under one pthread mutex with
// a condition variable: the hierarchy whose layout is installed, the vCPUs inside KVM_RUN, and a
// FIFO of tickets for the vCPUs that wait.
//  - wanted == installed and nobody waiting, or the installed layout still within its slice (and
//    not kicked): enter at once. A single vCPU always finds nobody inside and never waits.
//  - otherwise the vCPU takes a ticket; at the head of the queue it enters if the installed layout
//    is (now) its own, or installs its layout when no vCPU is inside KVM_RUN; else it waits for
//    them to leave. Past the slice nobody behind a waiting ticket enters, even with the installed
//    layout, so a stream of same-layout vCPUs cannot hold a layout forever (no starvation).
//  - a layout runs at least `slice` (NPTKIT_KVM_GATE_SLICE_US, default 2000 µs) before the head
//    waiter kicks the vCPUs inside KVM_RUN (immediate_exit + signal: their runs return
//    NPT_EXIT_KICKED, and the core runs them again); without a minimum, two vCPUs could kick each
//    other out before either executes an instruction. Most vCPUs leave earlier on their own (every
//    exit to the core or to the plugin's MMIO completion leaves the gate).
//  - a waiter holds nothing the vCPUs inside need (the gate's mutex is released while it waits),
//    and a vCPU leaves the gate after every KVM_RUN, including the ones whose exit the plugin
//    completes (MMIO, IN), so a completion that needs another KVM_RUN queues like any entry.
import CKVM
import CNPTKit
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// Process-wide counters (exported as npt_kvm_gate_stats).
let gateWaits = Atomic<UInt64>(0)
let gateKicks = Atomic<UInt64>(0)
let gateWaitNanos = Atomic<UInt64>(0)

/// Entries into KVM_RUN that had to wait at the layout gate, vCPUs the gate kicked out of KVM_RUN,
/// and the total time the waits took (ns).
@_cdecl("npt_kvm_gate_stats")
public func npt_kvm_gate_stats(_ waits: UnsafeMutablePointer<UInt64>?, _ kicks: UnsafeMutablePointer<UInt64>?,
                               _ waitNanos: UnsafeMutablePointer<UInt64>?) {
    waits?.pointee = gateWaits.load(ordering: .relaxed)
    kicks?.pointee = gateKicks.load(ordering: .relaxed)
    waitNanos?.pointee = gateWaitNanos.load(ordering: .relaxed)
}

/// The minimum time a layout runs before a waiter for another one kicks its vCPUs (ns).
let gateSliceNanos: UInt64 = {
    if let s = getenv("NPTKIT_KVM_GATE_SLICE_US"), let v = UInt64(String(cString: s)) { return v * 1000 }
    return 2_000_000
}()

final class LayoutGate: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    // All below: under `mutex`.
    /// The layout installed (nil: the layout at creation, all RAM).
    private var current: LayoutKey?
    /// The vCPUs inside KVM_RUN (between enter and leave), to kick.
    private var inside: [ObjectIdentifier: KVMVCPU] = [:]
    private var nextTicket: UInt64 = 0
    private var serving: UInt64 = 0
    /// When the current layout was installed, and whether its vCPUs were kicked since.
    private var sliceStart: UInt64 = 0
    private var kickedSlice = false

    init() {
        pthread_mutex_init(mutex, nil)
        var a = pthread_condattr_t()
        pthread_condattr_init(&a)
        pthread_condattr_setclock(&a, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &a)
        pthread_condattr_destroy(&a)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    /// Waits until `v` may enter KVM_RUN under the layout of `want`; `install` puts a layout in
    /// place (called with no vCPU inside KVM_RUN, or for `want` == the installed hierarchy, whose
    /// layout may need recomputing after an invalidate). On return `v` counts as inside: call
    /// `leave` after the run (also when this throws nothing but the run fails).
    func enter(_ v: KVMVCPU, _ want: LayoutKey, install: (LayoutKey) throws(Errno) -> Void) throws(Errno) {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        var ticket: UInt64?
        var waitedSince: UInt64?
        defer {
            if let t0 = waitedSince {
                gateWaits.add(1, ordering: .relaxed)
                gateWaitNanos.add(monotonicNanos() - t0, ordering: .relaxed)
            }
        }
        while true {
            if let t = ticket, t == serving {
                if want != current {
                    if inside.isEmpty {
                        do {
                            try install(want)
                        } catch {
                            serving += 1
                            pthread_cond_broadcast(cond)
                            throw error
                        }
                        current = want
                        sliceStart = monotonicNanos()
                        kickedSlice = false
                    } else {
                        // The head waiter: let the installed layout have its slice, then kick.
                        let now = monotonicNanos()
                        if waitedSince == nil { waitedSince = now }
                        if now - sliceStart >= gateSliceNanos {
                            if !kickedSlice {
                                kickedSlice = true
                                for u in inside.values { u.kick() }
                                gateKicks.add(UInt64(inside.count), ordering: .relaxed)
                            }
                            pthread_cond_wait(cond, mutex)
                        } else {
                            let until = sliceStart + gateSliceNanos
                            var ts = timespec(tv_sec: Int(until / 1_000_000_000), tv_nsec: Int(until % 1_000_000_000))
                            _ = pthread_cond_timedwait(cond, mutex, &ts)
                        }
                        continue
                    }
                } else {
                    try install(want)   // the same hierarchy: only a stale layout (invalidate) changes
                }
                serving += 1
                pthread_cond_broadcast(cond)   // the next ticket may be for this layout too
                break
            }
            if ticket == nil {
                // The installed layout's vCPUs go on while nobody waits, or within its slice (then
                // the head waiter's kick ends it, and from then on they queue behind it).
                if want == current
                    && (serving == nextTicket || (!kickedSlice && monotonicNanos() - sliceStart < gateSliceNanos)) {
                    try install(want)
                    break
                }
                ticket = nextTicket
                nextTicket += 1
                continue
            }
            if waitedSince == nil { waitedSince = monotonicNanos() }
            pthread_cond_wait(cond, mutex)
        }
        inside[ObjectIdentifier(v)] = v
    }

    /// After KVM_RUN returned (and its exit was decoded under the layout it ran with).
    func leave(_ v: KVMVCPU) {
        pthread_mutex_lock(mutex)
        inside[ObjectIdentifier(v)] = nil
        pthread_cond_broadcast(cond)
        pthread_mutex_unlock(mutex)
    }
}
