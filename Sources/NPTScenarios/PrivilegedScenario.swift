import CScenarioGuests
import NPTCore
import Synchronization
#if canImport(Glibc)
import Glibc
import NPTHost
#endif

/// A guest image of the privileged-mode scenario for one guest ISA (protocol PRIV_* of
/// `Guests/include/scenario_protocol.h`).
package struct PrivilegedImage: ScenarioImage {
    package struct Region: Sendable {
        package var start: UInt64
        package var size: UInt64
        package var contents: [UInt8]
        package var entryOffset: UInt64
        /// Where in the region the handler keeps its entry count.
        package var countOffset: UInt64
    }
    package var guest: GuestSetup
    /// A vCPU's state at the loop's entry (the driver adds PRIV_REG_HEARTBEAT).
    package var loopEntry: Registers
    /// The heartbeat of vCPU i is at heartbeats + i * heartbeatStride (heartbeatStride bytes).
    package var heartbeats: UInt64
    package var heartbeatStride: UInt64
    /// How many heartbeats the handler sums (the most vCPUs the image serves).
    package var maxCPUs: Int
    package var region: Region
    /// Where a blocked probe exits to the VMM (the simulator: an EPT violation on the absent
    /// region), how the VMM completes it: the probe's length and the register that reads all ones.
    /// nil: a probe never exits (KVM answers a read of a GPA without memory with all ones).
    package var probeCompletion: (length: UInt64, register: Int)?
    /// The register holding the address the loop probes, where the image takes it from one (so a
    /// benchmark can point it at RAM); nil: fixed in the image.
    package var probeAddressRegister: Int?
}

/// The privileged-mode (SMM-like) scenario: `cpus` vCPUs on real threads run a loop that bumps
/// their heartbeat in RAM and probes the special region (the probe must never read it: the region is
/// in no view outside the mode). Enter-mode requests are raised on the vCPUs: `requests` from one
/// thread on random vCPUs, then `bursts` rounds in which every vCPU's request is raised at once,
/// each from a thread of its own. The region's handler sums every heartbeat, spins, sums again (a
/// difference means a CPU outside the mode ran while the region was visible), counts its entry in
/// region memory and executes RSM. One driver for every backend.
package struct PrivilegedScenario: Sendable {
    package static let name = "privileged mode"

    package var cpus: Int
    package var requests: Int
    package var bursts: Int
    package var seed: UInt64
    /// Pause between two of the `requests` (0: as fast as possible).
    package var pauseNanos: UInt64
    package var stopTimeoutNanos: UInt64
    /// How long the driver waits for the requests to be served.
    package var serveTimeoutNanos: UInt64
    /// false: the loop probes RAM instead of the region (no probe exits; an image whose probe
    /// target is fixed refuses).
    package var probeRegion: Bool

    package init(cpus: Int, requests: Int, bursts: Int = 0, seed: UInt64 = 1, pauseNanos: UInt64 = 0,
                stopTimeoutNanos: UInt64 = 10_000_000_000, serveTimeoutNanos: UInt64 = 60_000_000_000, probeRegion: Bool = true) {
        self.cpus = cpus; self.requests = requests; self.bursts = bursts; self.seed = seed; self.pauseNanos = pauseNanos
        self.stopTimeoutNanos = stopTimeoutNanos; self.serveTimeoutNanos = serveTimeoutNanos; self.probeRegion = probeRegion
    }

    /// The image for `isa`, serving `cpus` vCPUs.
    package static func image(for isa: GuestISA, cpus: Int) throws(NPTError) -> PrivilegedImage {
        let image = try Scenarios.image(name, for: isa, simulator: PrivilegedSim.image(cpus: cpus), x86_64: PrivilegedX86.image)
        guard cpus >= 1 && cpus <= image.maxCPUs else {
            throw NPTError(.invalidArgument, "scenario '\(name)': \(cpus) vCPUs; its \(isa) image serves 1 to \(image.maxCPUs)")
        }
        return image
    }

    package struct Outcome: Sendable {
        /// Probes that read anything but all ones (the region leaked to a vCPU outside the mode).
        package var leaks = 0
        /// Handler entries that saw the heartbeats move.
        package var movedWhileVisible = 0
        /// Handler entries whose r0 was not the entering vCPU's index.
        package var wrongIndex = 0
        package var handlerCounts: [UInt64] = []
        package var heartbeatOUTs = 0
        /// Probes made (one per loop iteration: the heartbeats' sum in RAM), and those blocked.
        package var probes: UInt64 = 0
        package var probesBlocked: UInt64 = 0
        package var heartbeats: [UInt64] = []
        package var failures = 0
        package var stats = PrivilegedStatistics()
        package var records: [PrivilegedEntryRecord] = []
        /// Instructions run outside the mode while the region was visible, where the backend counts
        /// instructions (`instructionsCounted`).
        package var outsideWhileVisible: UInt64 = 0
        package var instructionsCounted = false
        /// The backend's own statistics of the VM at the end (npt_vm_backend_stats; [] where it keeps none).
        package var backendStatistics: [BackendStatistic] = []
        package var finalState = PMState(cpus: 0)
        /// The region is in no hierarchy once the requests were served.
        package var regionAbsentAfter = false
        package var requested = 0
        package var wallNanos: UInt64 = 0
    }

    /// Builds the VM's guest and region; returns the vCPUs with their registers set.
    package func prepare(_ vm: VirtualMachine) throws(NPTError) -> [VirtualCPU] {
        let image = try PrivilegedScenario.image(for: vm.guestISA, cpus: cpus)
        if !probeRegion && image.probeAddressRegister == nil {
            throw NPTError(.unsupported, "scenario '\(PrivilegedScenario.name)': the \(image.isa) image's probe target is fixed in the image")
        }
        try Scenarios.load(vm, memory: image.memory, policy: image.policy.ranges)
        try vm.defineRegion(start: GPA(image.region.start), size: image.region.size, contents: image.region.contents,
                            entryOffset: image.region.entryOffset)
        vm.privileged.stopTimeoutNanos = stopTimeoutNanos
        var out: [VirtualCPU] = []
        for i in 0..<cpus {
            let cpu = try vm.makeVCPU(index: UInt32(i))
            var r = image.loopEntry
            r.gpr[Int(PRIV_REG_HEARTBEAT)] = image.heartbeats + UInt64(i) * image.heartbeatStride
            if let p = image.probeAddressRegister { r.gpr[p] = probeRegion ? image.region.start : image.heartbeats }
            try cpu.setRegisters(r)
            out.append(cpu)
        }
        return out
    }

    private struct Seen: Sendable {
        var leaks = 0, moved = 0, wrongIndex = 0, heartbeatOUTs = 0, failures = 0
        var counts: [UInt64] = []
        mutating func add(_ o: Seen) {
            leaks += o.leaks; moved += o.moved; wrongIndex += o.wrongIndex; heartbeatOUTs += o.heartbeatOUTs
            failures += o.failures; counts += o.counts
        }
    }

    /// One vCPU's loop until its own observation, under the coordinator's monitor, that all
    /// `requests` were served (or until `abort`: another thread failed, or the requests were not
    /// served in time): the protocol's reports, blocked probes completed where the image says so.
    /// The threads stop on what each saw in the monitor's order, not on a flag the main thread sets:
    /// a replay (which reproduces that order) makes each thread run as many times as recorded.
    private static func drive(_ cpu: VirtualCPU, _ vm: VirtualMachine, _ image: PrivilegedImage, requests: UInt64,
                              abort: borrowing Atomic<Bool>) throws(NPTError) -> Seen {
        var s = Seen()
        let region = GPARange(start: GPA(image.region.start), size: image.region.size)
        while !abort.load(ordering: .acquiring), !(try vm.privileged.served(requests, observer: cpu)) {
            let x = try cpu.run()
            switch x.reason {
            case .budget, .kicked: continue
            case .io:
                switch Int32(truncatingIfNeeded: x.ioPort) {
                case PRIV_PORT_HEARTBEAT: s.heartbeatOUTs += 1
                case PRIV_PORT_LEAK: s.leaks += 1
                case PRIV_PORT_ENTERED: if UInt32(truncatingIfNeeded: x.ioValue) != cpu.index { s.wrongIndex += 1 }
                case PRIV_PORT_MOVED: if x.ioValue & 0xFFFF_FFFF != 0 { s.moved += 1 }
                case PRIV_PORT_COUNT: s.counts.append(x.ioValue & 0xFFFF_FFFF)
                default: throw Scenarios.unexpected(name, x, cpu: cpu.index)
                }
            case .mbecViolation where region.contains(x.gpa) && image.probeCompletion != nil:
                // The probe could not read the region: complete it as a read of nothing.
                let c = image.probeCompletion!
                var r = try cpu.registers()
                r.gpr[c.register] = .max
                r.rip += c.length
                try cpu.setRegisters(r)
            case .privilegedEntryFailed:
                s.failures += 1
            default:
                throw Scenarios.unexpected(name, x, cpu: cpu.index)
            }
        }
        return s
    }

    /// Runs the scenario on `vm` (a backend with NPT_CAP_PRIVILEGED_MODE).
    package func run(on vm: VirtualMachine) throws(NPTError) -> Outcome {
        let image = try PrivilegedScenario.image(for: vm.guestISA, cpus: cpus)
        let vcpus = try prepare(vm)
        let done = Atomic<Bool>(false)
        let target = UInt64(requests + bursts * cpus)
        let seen = NPTMutex(Seen())
        let failure = NPTMutex<NPTError?>(nil)
        let t0 = Monitor.now()
        let threads = vcpus.map { cpu in
            HostThread {
                do throws(NPTError) {
                    let s = try PrivilegedScenario.drive(cpu, vm, image, requests: target, abort: done)
                    seen.withLock { $0.add(s) }
                } catch {
                    failure.withLock { $0 = $0 ?? error }
                    done.store(true, ordering: .releasing)
                }
            }
        }
        var raised = 0
        let served: () -> Bool = { (try? vm.privileged.served(UInt64(raised), observer: nil)) ?? false }
        let deadline = t0 &+ serveTimeoutNanos
        func waitServed() -> Bool {
            while !served() {
                if done.load(ordering: .acquiring) || Monitor.now() >= deadline { return false }
                sleepNanos(200_000)
            }
            return true
        }
        do throws(NPTError) {
            // One thread on random vCPUs.
            var rng = seed | 1
            for _ in 0..<requests where !done.load(ordering: .acquiring) {
                rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
                try vcpus[Int(rng % UInt64(vcpus.count))].raisePrivileged()
                raised += 1
                if pauseNanos > 0 { sleepNanos(pauseNanos) }
            }
            // Bursts: every vCPU's request at once, each from a thread of its own.
            for _ in 0..<bursts where waitServed() {
                let go = Atomic<Bool>(false)
                let raisers = vcpus.map { cpu in
                    HostThread {
                        while !go.load(ordering: .acquiring) { sched_yield() }
                        do throws(NPTError) { try cpu.raisePrivileged() } catch { failure.withLock { $0 = $0 ?? error } }
                    }
                }
                go.store(true, ordering: .releasing)
                for t in raisers { t.join() }
                raised += vcpus.count
            }
        } catch {
            failure.withLock { $0 = $0 ?? error }
        }
        let allServed = waitServed()
        // The vCPU threads stop on their own observation; told to only when something failed.
        if !allServed || raised != Int(target) { done.store(true, ordering: .releasing) }
        for t in threads { t.join() }
        if let e = failure.withLock({ $0 }) { throw e }
        if !allServed {
            throw NPTError(.state, "scenario '\(PrivilegedScenario.name)': \(vm.privileged.statistics.entries) of \(raised) requests served in \(serveTimeoutNanos / 1_000_000_000) s")
        }
        let s = seen.withLock { $0 }
        var o = Outcome()
        o.leaks = s.leaks; o.movedWhileVisible = s.moved; o.wrongIndex = s.wrongIndex; o.heartbeatOUTs = s.heartbeatOUTs
        o.failures = s.failures; o.handlerCounts = s.counts.sorted()
        o.requested = raised
        o.wallNanos = Monitor.now() - t0
        for i in 0..<cpus {
            let v = try Scenarios.read64(vm, image.heartbeats + UInt64(i) * image.heartbeatStride)
            o.heartbeats.append(image.heartbeatStride >= 8 ? v : v & ((1 << (8 * image.heartbeatStride)) - 1))
        }
        o.probes = o.heartbeats.reduce(0, +)
        o.probesBlocked = o.probes - min(o.probes, UInt64(o.leaks))
        o.stats = vm.privileged.statistics
        o.records = vm.privileged.entryRecords
        // The backend's own check, where it keeps one (a statistic of that name).
        o.backendStatistics = try vm.backendStatistics()
        let checked = o.backendStatistics.value(BackendStatistic.outsideWhileVisible)
        o.instructionsCounted = checked != nil
        o.outsideWhileVisible = checked ?? 0
        o.finalState = vm.privileged.protocolState
        o.regionAbsentAfter = HierarchyID.allCases.allSatisfy { !vm.snapshot.translate(GPA(image.region.start), in: $0).present }
        return o
    }

    /// Runs the scenario on a VM of `host` in `mode`.
    package func run(host: ScenarioHost, mode: VMConfig.MBECMode) throws -> Outcome {
        let image = try PrivilegedScenario.image(for: host.guestISA, cpus: cpus)
        return try host.withVM(image.config(mode: mode)) { vm in try run(on: vm) }
    }
}

