import NPTTrace
import Synchronization

/// The special region of the privileged mode: its code lives here and is visible to the VM's one
/// global memory view only while one CPU is in the mode.
package struct PrivilegedRegion: Sendable, Equatable {
    package var range: GPARange
    package var permissions: EPTPermissions
    /// Where a CPU entering the mode starts, from the region's start.
    package var entryOffset: UInt64
    package var hostOffset: UInt64
}

/// Figures of the privileged mode (all CPUs).
package struct PrivilegedStatistics: Sendable, Equatable {
    package var requests: UInt64 = 0
    package var entries: UInt64 = 0
    package var failures: UInt64 = 0
    package var deferredInterrupts: UInt64 = 0
    /// Interrupt-to-entry latency, summed and largest (nanoseconds).
    package var entryLatencyTotal: UInt64 = 0
    package var entryLatencyMax: UInt64 = 0
    /// How long the other CPUs were stopped, from the stop request to their resumption, summed.
    package var stoppedTotal: UInt64 = 0
    package init() {}
}

/// One entry, for the demo's timeline.
package struct PrivilegedEntryRecord: Sendable, Equatable {
    package var cpu: UInt32
    package var raisedAt: UInt64
    package var enteredAt: UInt64
    package var leftAt: UInt64
    /// From the stop request to the others' resumption.
    package var othersStopped: UInt64
}

/// Runs `PMProtocol` for a VM's real vCPU threads: each transition is taken under one monitor on
/// behalf of the vCPU whose thread calls in; a stopped vCPU's thread is parked in `checkpoint`.
package final class PrivilegedModeCoordinator: @unchecked Sendable {
    let monitor = Monitor()
    // Guarded by `monitor`.
    private var state = PMState(cpus: 0)
    /// The vCPU of each protocol slot; nil for a slot freed by a destroyed vCPU (reused by the next).
    private var slots: [VirtualCPU?] = []
    private var freeSlots: [Int] = []
    private var raisedAt: [[UInt64]] = []
    private var deferred: [[UInt32]] = []
    /// Whether the vCPU's thread may be running guest code (between a checkpoint that let it run
    /// and its return to the VMM). A vCPU not in guest cannot run guest code without passing a
    /// checkpoint, so the coordinator acknowledges a stop on its behalf.
    private var inGuest: [Bool] = []
    /// One condition per vCPU, so a change wakes only the vCPUs it concerns.
    private var conds: [Monitor.Condition] = []
    private var saved: Registers?
    private var stopBegan: UInt64 = 0
    private var enteredAt: UInt64 = 0
    private var currentRaise: UInt64 = 0
    private var stats = PrivilegedStatistics()
    private var records: [PrivilegedEntryRecord] = []
    /// How long a coordinator waits for the others to stop.
    package var stopTimeoutNanos: UInt64 {
        get { monitor.withLock { timeout } }
        set { monitor.withLock { timeout = newValue } }
    }
    private var timeout: UInt64 = 1_000_000_000
    /// Set once a region exists; until then `checkpoint` costs nothing (read without the monitor).
    private let activeFlag = Atomic<Bool>(false)
    var active: Bool { activeFlag.load(ordering: .acquiring) }
    /// The VM's backend when the monitor's acquisitions are recorded or replayed (lock turns,
    /// docs/replay-privileged-mode.md), used once `active`; nil: each acquisition costs this check.
    private let turns: (any BackendVM)?
    private let replays: Bool

    init(backend: any BackendVM) {
        let mode = backend.lockTurns
        turns = mode == .none ? nil : backend
        replays = mode == .replay
    }

    func activate() { monitor.withLock { activeFlag.store(true, ordering: .releasing) } }

    /// The backend that takes the turns: from the region's definition on, in a recorded or replayed VM.
    private var gate: (any BackendVM)? { turns != nil && active ? turns : nil }

    /// Takes the monitor for `site` (on behalf of vCPU `vcpu`; nil: the VMM) in its turn: recorded
    /// once held, or (a replay) waited for outside it and consumed once held. Returns the value to
    /// use (`value`, or the recorded one). On a failure the monitor is not held.
    @discardableResult
    private func acquire(_ site: TraceLockSite, _ vcpu: UInt32?, value: UInt64 = 0) throws(NPTError) -> UInt64 {
        guard let g = gate else { monitor.lock(); return value }
        while true {
            if replays { _ = try g.lockTurn(site, vcpu: vcpu, phase: .wait, value: value) }
            monitor.lock()
            do throws(NPTError) {
                return try g.lockTurn(site, vcpu: vcpu, phase: .taken, value: value)
            } catch {
                monitor.unlock()
                // Another thread of the same party took the record meanwhile: wait for the next one.
                guard replays && error.code == .busy else { throw error }
            }
        }
    }

    /// `acquire` where the caller cannot fail: on a failure the monitor is taken anyway (the
    /// recording keeps its first failure for `finish`; a failed replay fails every later call).
    private func acquireAnyway(_ site: TraceLockSite, _ vcpu: UInt32?) {
        do throws(NPTError) { try acquire(site, vcpu) } catch { monitor.lock() }
    }

    /// `body` under the monitor taken in its turn (a read or a short transition that cannot fail).
    private func locked<T>(_ site: TraceLockSite, _ vcpu: UInt32?, _ body: () -> T) -> T {
        acquireAnyway(site, vcpu)
        defer { monitor.unlock() }
        return body()
    }

    /// Waits on `c` (the monitor held, and held again on return, also on a failure); returns
    /// `outcome` of the wait's result once woken. A recording writes the re-acquisition with the
    /// outcome; a replay does not wait on `c` at all: it releases the monitor and takes it again in
    /// the recorded turn, with the recorded outcome (a timed-out wait is a recorded decision).
    private func waitInTurn(_ c: Monitor.Condition, until deadline: UInt64?, _ site: TraceLockSite, _ vcpu: UInt32,
                       outcome: (Bool) -> Bool = { _ in false }) throws(NPTError) -> Bool {
        guard let g = gate else { return outcome(monitor.wait(on: c, untilNanos: deadline)) }
        if replays {
            monitor.unlock()
            do throws(NPTError) { return try acquire(site, vcpu) != 0 } catch { monitor.lock(); throw error }
        }
        let o = outcome(monitor.wait(on: c, untilNanos: deadline))
        _ = try g.lockTurn(site, vcpu: vcpu, phase: .taken, value: o ? 1 : 0)
        return o
    }

    /// A new vCPU joins the protocol. While another vCPU is entering or in the mode the new one
    /// starts stopped (its thread is outside guest code, so the stop is acknowledged on its
    /// behalf): no vCPU outside the mode may run while the region can be visible.
    func register(_ cpu: VirtualCPU) -> Int {
        monitor.withLock {
            let busy = state.holder >= 0
            let i: Int
            if let f = freeSlots.popLast() {
                i = f
                slots[i] = cpu
            } else {
                i = slots.count
                state.phase.append(.running)
                state.stopRequested.append(false)
                state.pending.append(0)
                state.deferred.append(0)
                state.reachesRegion.append(false)
                slots.append(cpu)
                raisedAt.append([])
                deferred.append([])
                inGuest.append(false)
                conds.append(monitor.makeCondition())
            }
            resetSlot(i, stopped: busy, stopRequested: busy)
            return i
        }
    }

    /// Slot `i` as a fresh vCPU's (or a departed one's): nothing pending, deferred or raised, not in
    /// the guest. Caller holds the monitor.
    private func resetSlot(_ i: Int, stopped: Bool, stopRequested: Bool) {
        state.phase[i] = stopped ? .stopped : .running
        state.stopRequested[i] = stopRequested
        state.pending[i] = 0
        state.deferred[i] = 0
        state.reachesRegion[i] = false
        raisedAt[i] = []
        deferred[i] = []
        inGuest[i] = false
    }

    /// A destroyed vCPU leaves the protocol; its slot is reused. Refused while it holds the mode or
    /// is entering it. Its queued requests are dropped; until reused, the slot counts as stopped
    /// (it can run no guest code), so no entry waits for it.
    func unregister(_ cpu: VirtualCPU) throws(NPTError) {
        try monitor.withLock { () throws(NPTError) in
            let i = cpu.slot
            guard slots.indices.contains(i), slots[i] === cpu else { return }
            if Int(state.holder) == i {
                throw NPTError(.busy, "vCPU \(cpu.index) is in (or entering) the privileged mode")
            }
            state.queue.removeAll { Int($0) == i }
            resetSlot(i, stopped: true, stopRequested: false)
            slots[i] = nil
            freeSlots.append(i)
            wake()
        }
    }

    /// The VM is destroyed: forget the vCPUs (every one is closed; none runs).
    func shutdown() {
        monitor.withLock {
            for i in slots.indices where slots[i] != nil { slots[i] = nil; freeSlots.append(i) }
            saved = nil
        }
    }

    /// Slots in use and free (tests: destroyed vCPUs must not leak slots).
    package var slotCounts: (used: Int, free: Int) { monitor.withLock { (slots.count - freeSlots.count, freeSlots.count) } }

    /// The lock is held: wakes each vCPU that now has a step to take.
    private func wake() {
        for j in 0..<state.cpus {
            let acts: [PMAction] = [.acceptStop(j), .queueRequest(j), .beginEntry(j), .enter(j), .resume(j)]
            if acts.contains(where: { PMProtocol.enabled($0, in: state) }) { conds[j].signal() }
        }
    }

    package var statistics: PrivilegedStatistics { locked(.read, nil) { stats } }
    package var entryRecords: [PrivilegedEntryRecord] { locked(.read, nil) { records } }

    /// The vCPU in the mode, if any.
    package var holder: UInt32? { locked(.read, nil) { holderIndex } }
    /// The lock is held.
    private var holderIndex: UInt32? {
        state.holder >= 0 && state.phase[Int(state.holder)] == .inMode ? slots[Int(state.holder)]?.index : nil
    }

    /// Whether `count` requests were served (entered or failed) and no vCPU is in the mode: one
    /// observation under the monitor, in its turn, by `observer`'s thread (nil: the VMM's). A driver
    /// that stops its vCPU threads on it makes each thread's number of runs follow the monitor's
    /// order, which a replay reproduces (a flag set by another thread would not be).
    package func served(_ count: UInt64, observer: VirtualCPU?) throws(NPTError) -> Bool {
        let v = try view(observer: observer)
        return v.stats.entries + v.stats.failures >= count && v.holder == nil
    }

    /// The holder and the counts, read in one acquisition of the monitor.
    package struct View: Sendable, Equatable {
        package var holder: UInt32?
        package var stats: PrivilegedStatistics
    }

    /// One observation under the monitor, in its turn, by `observer`'s thread (nil: the VMM's):
    /// a recording orders it with that thread's other turns (npt_vcpu_privileged_view).
    package func view(observer: VirtualCPU?) throws(NPTError) -> View {
        try acquire(observer == nil ? .read : .vcpuRead, observer?.index)
        defer { monitor.unlock() }
        return View(holder: holderIndex, stats: stats)
    }

    /// The enter-mode interrupt for `cpu`. Callable from any thread.
    package func raise(_ cpu: VirtualCPU) throws(NPTError) {
        guard active else { throw NPTError(.state, "no privileged-mode region is defined for this VM") }
        try acquire(.raise, cpu.index)
        PMProtocol.apply(.raise(cpu.slot), to: &state)
        raisedAt[cpu.slot].append(Monitor.now())
        stats.requests += 1
        wake()
        monitor.unlock()
        cpu.kick()
    }

    /// Another interrupt for `cpu`: delivered now (to the guest's fault handler) if the CPU runs,
    /// or after it resumes if it is stopped. Returns whether it was deferred.
    @discardableResult
    package func interrupt(_ cpu: VirtualCPU, vector: UInt32) -> Bool {
        let deferredNow: Bool = locked(.interrupt, cpu.index) {
            let p = state.phase.indices.contains(cpu.slot) ? state.phase[cpu.slot] : .running
            if active && (p == .stopped || p == .waiting) {
                deferred[cpu.slot].append(vector)
                stats.deferredInterrupts += 1
                PMProtocol.apply(.otherInterrupt(cpu.slot), to: &state)
                return true
            }
            return false
        }
        return deferredNow
    }

    /// Called by `cpu`'s own thread before it runs guest code. Takes the protocol's steps for it;
    /// parks the thread while the CPU is stopped or waits for its turn; enters the mode when it is
    /// its turn. Returns an exit for the VMM when an entry failed.
    func checkpoint(_ cpu: VirtualCPU) throws(NPTError) -> VMExit? {
        guard active else { return nil }
        let i = cpu.slot
        try acquire(.checkpoint, cpu.index)
        defer { monitor.unlock() }
        while true {
            if PMProtocol.enabled(.acceptStop(i), in: state) {
                PMProtocol.apply(.acceptStop(i), to: &state)
                wake()
                continue
            }
            if PMProtocol.enabled(.queueRequest(i), in: state) {
                PMProtocol.apply(.queueRequest(i), to: &state)
                continue
            }
            if PMProtocol.enabled(.beginEntry(i), in: state) {
                return try coordinateEntry(i)
            }
            if state.phase[i] == .inMode { inGuest[i] = true; return nil }
            if PMProtocol.enabled(.resume(i), in: state) {
                PMProtocol.apply(.resume(i), to: &state)
                let vectors = deferred[i]
                deferred[i] = []
                for v in vectors { try? cpu.backend.injectFault(vector: v, errorCode: 0, address: 0) }
                continue
            }
            if state.phase[i] == .running && state.pending[i] == 0 { inGuest[i] = true; return nil }
            _ = try waitInTurn(conds[i], until: nil, .checkpointWake, cpu.index)
        }
    }

    /// `cpu`'s thread returns to the VMM: it runs no guest code until its next checkpoint.
    func leftGuest(_ cpu: VirtualCPU) {
        guard active else { return }
        locked(.leftGuest, cpu.index) {
            let i = cpu.slot
            inGuest[i] = false
            if PMProtocol.enabled(.acceptStop(i), in: state) {
                PMProtocol.apply(.acceptStop(i), to: &state)
                wake()
            }
        }
    }

    /// The lock is held. Stops the others, waits for them, adds the region, enters.
    private func coordinateEntry(_ i: Int) throws(NPTError) -> VMExit? {
        PMProtocol.apply(.beginEntry(i), to: &state)
        currentRaise = raisedAt[i].isEmpty ? Monitor.now() : raisedAt[i].removeFirst()
        stopBegan = Monitor.now()
        wake()
        // Acknowledge for the vCPUs whose threads are outside guest code; kick the others.
        for j in 0..<state.cpus where j != i && !inGuest[j] && PMProtocol.enabled(.acceptStop(j), in: state) {
            PMProtocol.apply(.acceptStop(j), to: &state)
        }
        let others = slots.enumerated().filter { $0.offset != i && inGuest[$0.offset] }.compactMap(\.element)
        let me = slots[i]?.index ?? UInt32(i)
        monitor.unlock()
        for o in others { o.kick() }
        // Taken again in its turn; a failure of the turn (a replay that diverged) releases the
        // others as a timeout would: nobody entered.
        func abandon(_ e: NPTError) -> NPTError {
            PMProtocol.apply(.timeout(i), to: &state)
            stats.failures += 1
            wake()
            return e
        }
        do throws(NPTError) { try acquire(.entryRelock, me) } catch { monitor.lock(); throw abandon(error) }
        let deadline = Monitor.deadline(after: timeout)
        while !PMProtocol.enabled(.enter(i), in: state) {
            let timedOut: Bool
            do throws(NPTError) {
                timedOut = try waitInTurn(conds[i], until: deadline, .entryWake, me) { woke in
                    !woke && !PMProtocol.enabled(.enter(i), in: state) && Monitor.now() >= deadline
                }
            } catch { throw abandon(error) }
            if timedOut {
                let late = (0..<state.cpus).first { $0 != i && state.phase[$0] != .stopped && state.phase[$0] != .waiting } ?? i
                PMProtocol.apply(.timeout(i), to: &state)
                stats.failures += 1
                wake()
                var x = VMExit(reason: .privilegedEntryFailed)
                x.vector = slots[late]?.index ?? UInt32(late)
                slots[i]?.vm.setLastPrivilegedError("vCPU \(x.vector) did not stop within \(timeout / 1_000_000) ms; vCPU \(slots[i]?.index ?? UInt32(i)) did not enter and the view is unchanged")
                return x
            }
        }
        // Every other CPU is stopped: now (and only now) the region becomes visible.
        guard let cpu = slots[i] else { throw NPTError(.state, "privileged-mode slot \(i) has no vCPU") }
        let vm = cpu.vm
        vm.backendVM.regionVisibility(holder: cpu.index)
        var entered = false
        do throws(NPTError) {
            try vm.setRegionMapped(true)
            let r = try cpu.backend.registers()
            saved = r
            guard let region = vm.region else { throw NPTError(.state, "the privileged-mode region was removed") }
            // The backend is told, not left to infer it: it saves the interrupted state and puts the
            // vCPU in the mode's entry state (CPL 0, paging off, at the entry point).
            try cpu.backend.enterPrivileged(PrivilegedEntry(vcpuIndex: cpu.index, region: region.range,
                                                            entryRIP: region.range.start.raw + region.entryOffset),
                                            interrupted: r)
            entered = true
            try cpu.exposeForMode()
        } catch {
            if entered {
                try? cpu.backend.leavePrivileged()
                if let s = saved { try? cpu.backend.setRegisters(s) }
            }
            saved = nil
            try? vm.setRegionMapped(false)
            vm.backendVM.regionVisibility(holder: nil)
            PMProtocol.apply(.timeout(i), to: &state) // same release path: nobody entered
            stats.failures += 1
            wake()
            throw error
        }
        PMProtocol.apply(.enter(i), to: &state)
        enteredAt = Monitor.now()
        let latency = enteredAt - currentRaise
        stats.entries += 1
        stats.entryLatencyTotal &+= latency
        stats.entryLatencyMax = max(stats.entryLatencyMax, latency)
        return nil
    }

    /// RSM: remove the region, invalidate every translation that could reach it, restore the CPU's
    /// state, resume the others.
    func leave(_ cpu: VirtualCPU) throws(NPTError) {
        let i = cpu.slot
        let vm = cpu.vm
        try acquire(.leave, cpu.index)
        defer { monitor.unlock() }
        do {
            guard active, state.phase.indices.contains(i), state.phase[i] == .inMode else {
                throw NPTError(.state, "vCPU \(cpu.index) is not in the privileged mode")
            }
            try cpu.backend.leavePrivileged()
            try vm.setRegionMapped(false)
            PMProtocol.apply(.leave(i), to: &state)
            let restored: Registers
            if let s = saved { restored = s } else { restored = try cpu.backend.registers() }
            if let s = saved { try cpu.backend.setRegisters(s) }
            saved = nil
            try cpu.exposeAfterMode(restored)
            vm.backendVM.regionVisibility(holder: nil)
            PMProtocol.apply(.release(i), to: &state)
            let now = Monitor.now()
            stats.stoppedTotal &+= now - stopBegan
            records.append(PrivilegedEntryRecord(cpu: cpu.index, raisedAt: currentRaise, enteredAt: enteredAt,
                                                 leftAt: now, othersStopped: now - stopBegan))
            wake()
        }
    }

    func holds(_ cpu: VirtualCPU) -> Bool {
        locked(.vcpuRead, cpu.index) { state.phase.indices.contains(cpu.slot) && state.phase[cpu.slot] == .inMode }
    }

    /// The protocol state and which vCPUs may be in guest code (diagnostics).
    package var debugDescription: String { locked(.read, nil) { "\(state) inGuest \(inGuest.map { $0 ? 1 : 0 })" } }

    /// A snapshot of the protocol state (tests).
    package var protocolState: PMState { locked(.read, nil) { state } }
}
