import MBECReference
import NPTCore
import NPTSimulator
import Synchronization
import NPTHost

/// Policy versions for runs where the policy changes on another thread: version n is published
/// between `started` reaching n and `completed` reaching n. A step that began after `completed` was
/// s and ended before `started` passed e may have used any version in s...e; once `setPolicy`
/// returned, no step that begins later may use an older one (a revocation reaches every vCPU).
final class PolicyHistory: @unchecked Sendable {
    private let versions: Mutex<[@Sendable (UInt64) -> UInt64]>
    let started = Atomic<Int>(0)
    let completed = Atomic<Int>(0)
    let box: PolicyBox
    init(_ box: PolicyBox) { self.box = box; versions = Mutex([box.snapshot()]) }
    func version(_ v: Int) -> @Sendable (UInt64) -> UInt64 { versions.withLock { $0[v] } }

    /// Applies a change to the VM and records the new version around it.
    func change(_ vm: VirtualMachine, _ r: PolicyRange) throws {
        let n = versions.withLock { vs -> Int in
            for f in (r.range.start.raw >> 12)..<(r.range.end >> 12) { box.set(frame: f, r.permissions.rawValue) }
            vs.append(box.snapshot())
            return vs.count - 1
        }
        started.store(n, ordering: .sequentiallyConsistent)
        try vm.setPolicy(r)
        completed.store(n, ordering: .sequentiallyConsistent)
    }
}

extension Differential {
    /// Several vCPUs on their own threads, each with its own frames and page tables (so the
    /// reference of each is exact), while another thread changes the policy of everyone's frames
    /// and a third creates vCPUs, runs them a little and destroys them, also during the changes.
    /// Each step is checked against the reference under every policy version it may have seen.
    package static func threaded(_ config: DifferentialConfig, seed: UInt64, vcpus: Int, stepsPerVCPU: Int,
                                creations: Int) throws -> DifferentialReport {
        var config = config
        config.privilegedRegion = false
        config.nvdimm = false
        var rng = Rand(seed: seed)
        let parts = vcpus + 1
        let span = (Layout.ramFrames - Layout.firstFrame) / UInt64(parts)
        let tableSpan = UInt64(Layout.tableFrames.count) / UInt64(parts)
        var guests: [Guest] = []
        var ramPolicy = [UInt64](repeating: EPTPermissions([.read, .write]).rawValue, count: Int(Layout.ramFrames))
        var memory: [(UInt64, UInt64)] = []
        for k in 0..<parts {
            let lo = Layout.firstFrame + UInt64(k) * span
            var g = Guest(rng: &rng, frames: lo..<(lo + span), tableBase: UInt64(k) * tableSpan << 12,
                          tableLimit: (UInt64(k) + 1) * tableSpan << 12, nvdimm: false, region: false, confined: true)
            for f in g.watched where f < Layout.ramFrames { ramPolicy[Int(f)] = g.ramPolicy[Int(f)] }
            for f in lo..<(lo + span) { ramPolicy[Int(f)] = g.ramPolicy[Int(f)] }
            for f in g.memory.frames { for i in 0..<512 { memory.append((f << 12 + UInt64(i * 8), g.memory.read(f << 12 + UInt64(i * 8)))) } }
            g.watched = g.watched.filter { $0 >= lo && $0 < lo + span || g.tables.contains($0 << 12) }
            guests.append(g)
        }
        let reg = BackendRegistry()
        try reg.register(SimulatorBackend(name: "sim", withoutExits: config.withoutExits), makeDefault: true)
        let vm = try VirtualMachine(config: VMConfig(ramSize: Layout.ram, defaultPermissions: [.read, .write],
                                                     mbecMode: config.mode, maxStepsPerRun: 1), registry: reg)
        defer { try? vm.destroy() }
        var all = ReferenceMemory()
        for (g, w) in memory { all.write(g, w) }
        let box = PolicyBox(ram: ramPolicy)
        var loader = guests[0]
        loader.memory = all
        loader.ramPolicy = ramPolicy
        try load(loader, into: vm, policy: box, config: config)
        let history = PolicyHistory(box)

        let reports = Mutex<[DifferentialReport]>([])
        let stop = Atomic<Bool>(false)
        var threads: [HostThread] = []
        let configCopy = config
        for k in 0..<vcpus {
            let guest = guests[k]
            let seedK = rng.next()
            threads.append(HostThread {
                var r = DifferentialReport()
                do {
                    let pair = try Pair(config: configCopy, vm: vm, guest: guest, policy: box, index: UInt32(k))
                    r = try runChecked(pair, history: history, steps: stepsPerVCPU, seed: seedK)
                } catch { r.unclassified.append("vCPU \(k): \(error)") }
                reports.withLock { $0.append(r) }
            })
        }
        // The creator: vCPUs come and go while the policy changes.
        let creatorGuest = guests[vcpus]
        let creatorSeed = rng.next()
        threads.append(HostThread {
            var total = DifferentialReport()
            var crng = Rand(seed: creatorSeed)
            var memory = creatorGuest.memory   // carries on from one created vCPU to the next
            for c in 0..<creations {
                do {
                    let pair = try Pair(config: configCopy, vm: vm, guest: creatorGuest, policy: box, index: UInt32(1000 + c))
                    pair.ref.memory = memory
                    let r = try runChecked(pair, history: history, steps: 40, seed: crng.next())
                    memory = pair.ref.memory
                    total.add(r)
                    try vm.removeVCPU(pair.cpu)
                } catch { total.unclassified.append("creator: \(error)") }
            }
            reports.withLock { $0.append(total) }
        })
        // The policy changer, until the vCPU threads are done.
        let changerSeed = rng.next()
        let frames = guests.flatMap { g in g.watched.map { $0 } }
        let changer = HostThread {
            var prng = Rand(seed: changerSeed)
            var n = 0
            while !stop.load(ordering: .acquiring) {
                let f = prng.pick(frames)
                let p: EPTPermissions = f < Layout.firstFrame ? (prng.chance(70) ? [.read, .write] : .read) : PolicyChoice.pick(&prng)
                do { try history.change(vm, PolicyRange(start: GPA(f << 12), size: 0x1000, pageSize: .size4K, permissions: p)) }
                catch { reports.withLock { var r = DifferentialReport(); r.unclassified.append("changer: \(error)"); $0.append(r) }; return }
                n += 1
                sleepNanos(prng.below(200_000))
            }
            reports.withLock { var r = DifferentialReport(); r.policyChanges = n; $0.append(r) }
        }
        for t in threads { t.join() }
        stop.store(true, ordering: .releasing)
        changer.join()
        var total = DifferentialReport()
        for r in reports.withLock({ $0 }) { total.add(r) }
        return total
    }

    /// Steps `pair` checking each step against every policy version it may have seen.
    static func runChecked(_ pair: Pair, history: PolicyHistory, steps: Int, seed: UInt64) throws -> DifferentialReport {
        var rng = Rand(seed: seed)
        let config = pair.config
        try pair.setState(pair.guest.randomState(&rng, smep: config.smep))
        for _ in 0..<steps {
            let s = history.completed.load(ordering: .sequentiallyConsistent)
            let pre = pair.ref
            let active = pair.cpu.active
            let x = try pair.cpu.run()
            let e = history.started.load(ordering: .sequentiallyConsistent)
            pair.report.steps += 1
            guard let emu = ReferenceOutcome(x) else {
                pair.report.unclassified.append("\(config.name) threaded: unexpected exit \(x)")
                try pair.resync()
                continue
            }
            let regs = try pair.cpu.registers()
            var matched: ReferenceOutcome?
            var lastTruth = ReferenceOutcome.stepped
            for v in s...max(s, e) {
                pair.ref = pre
                pair.ref.policy = history.version(v)
                let t = pair.referenceStep()
                lastTruth = t
                guard t == emu && regs == pair.ref.cpu.registers else { continue }
                var same = true
                for g in pair.ref.writes {
                    var w: UInt64 = 0
                    try withUnsafeMutableBytes(of: &w) { try pair.vm.readMemory(GPA(g), $0) }
                    if w != pair.ref.memory.read(g) { same = false; break }
                }
                if same { matched = t; break }
            }
            pair.ref.policy = { [box = history.box] in box.get($0) }
            if let t = matched {
                pair.count(pre: pre.cpu, truth: t)
                if t.stopsProgress { try pair.setState(pair.guest.randomState(&rng, smep: config.smep)) }
                continue
            }
            if let c = pair.classify(pre: pre.cpu, active: active, emu: emu, truth: lastTruth), config.allowed.contains(c) {
                pair.report.divergences[c, default: 0] += 1
            } else {
                let r = pair.ref.cpu.registers
                var diff: [String] = []
                if regs.rip != r.rip { diff.append("rip \(hex(regs.rip))/\(hex(r.rip))") }
                if regs.cpl != r.cpl { diff.append("cpl \(regs.cpl)/\(r.cpl)") }
                for i in 0..<16 where regs.gpr[i] != r.gpr[i] { diff.append("r\(i) \(hex(regs.gpr[i]))/\(hex(r.gpr[i]))") }
                if regs.cr2 != r.cr2 { diff.append("cr2") }
                for g in pair.ref.writes {
                    var w: UInt64 = 0
                    try withUnsafeMutableBytes(of: &w) { try pair.vm.readMemory(GPA(g), $0) }
                    if w != pair.ref.memory.read(g) { diff.append("mem \(hex(g)) \(hex(w))/\(hex(pair.ref.memory.read(g)))") }
                }
                pair.report.unclassified.append("""
                    \(config.name) threaded vCPU \(pair.index): rip \(hex(pre.cpu.rip)) cpl \(pre.cpu.cpl) active \(active): \
                    emulation \(emu) vs reference \(lastTruth) (policy versions \(s)...\(e)); differ (emu/ref): \(diff.joined(separator: ", "))
                    """)
            }
            try pair.resync()
            if lastTruth.stopsProgress { try pair.setState(pair.guest.randomState(&rng, smep: config.smep)) }
        }
        return pair.report
    }
}
