import NPTCore
import NPTSimulator
import Testing

/// Differential test: the emulation (shadow hierarchies + exits + core decisions, on the simulator)
/// against the reference model of true hardware MBEC, on random guest page tables, policies and
/// programs. Every step's outcome and the whole register file are compared. Every divergence must
/// fall in a documented class (README, "Where the emulation differs from hardware MBEC"); anything
/// else fails the test with its seed.
enum DivergenceClass: String, CaseIterable, Sendable {
    /// Lazy mode: after a return to user mode the supervisor hierarchy stays exposed, so a user fetch
    /// of a page that is supervisor-execute-only but mapped at a user-mode address executes.
    case lazyStaleSupervisor
    /// SMEP off: the supervisor fetches from a user-mode address, which hardware MBEC governs by the
    /// user-execute bit while the exposed hierarchy is chosen per privilege level.
    case smepOffUserAddress
    /// SMEP off, exact mode: after such a fetch switched to the user hierarchy, supervisor code at a
    /// supervisor address runs under it until a violation switches back.
    case smepOffUserHierarchyAtCPL0
}

struct EpisodeResult: Sendable {
    var steps = 0
    var fetchesCompared = 0
    var divergences: [DivergenceClass: Int] = [:]
    var policyChangesWhileRunning = 0
    var supervisorOnlyAtUserAddressAfterReturn = 0
    var fetchesInMixed2M = 0
    var unclassified: [String] = []
}

struct Episode {
    let seed: UInt64
    let mode: VMConfig.MBECMode
    let smep: Bool
    static let ram: UInt64 = 8 << 20
    static let userBase: UInt64 = 0x40_0000
    static let kernelBase: UInt64 = 0xFFFF_8000_0000_0000
    static let mixedRegion: UInt64 = 4 << 20   // a 2 MiB block with mixed policy
    static let pages = 40

    static let policyChoices: [(EPTPermissions, Int)] = [
        ([.read, .write], 30), ([.read, .supervisorExecute], 15), ([.read, .userExecute], 15),
        ([.read, .supervisorExecute, .userExecute], 10), ([.read], 8), ([], 4),
        ([.supervisorExecute], 5), ([.userExecute], 5), (.all, 8),
    ]

    static func pick<R: RandomNumberGenerator>(_ rng: inout R) -> EPTPermissions {
        var n = Int(rng.next() % 100)
        for (p, w) in policyChoices { if n < w { return p }; n -= w }
        return .all
    }

    func run(maxSteps: Int) throws -> EpisodeResult {
        var rng = SplitMix64(seed: seed)
        var image = GuestImage()
        var pt = GuestPageTableBuilder(image: &image, tableArea: GPARange(start: GPA(0), size: 0x40000))
        let firstFrame: UInt64 = 0x40
        let lastFrame = Episode.ram >> 12

        // Policy: random 4 KiB pages, and a 2 MiB block made uniform then partly changed.
        var policy = [EPTPermissions](repeating: [.read, .write], count: Int(lastFrame))
        for f in 0..<Int(lastFrame) { policy[f] = f < Int(firstFrame) ? [.read, .write] : Episode.pick(&rng) }
        let mixedBase = Int(Episode.mixedRegion >> 12)
        let uniform = Episode.pick(&rng)
        for f in mixedBase..<(mixedBase + 512) { policy[f] = uniform }
        for _ in 0..<24 { policy[mixedBase + Int(rng.next() % 512)] = Episode.pick(&rng) }

        // Guest mappings: user and supervisor linear pages on random frames (aliases included).
        var codeAddresses: [UInt64] = []
        var dataAddresses: [UInt64] = []
        var framesUsed: [UInt64] = []
        for region in 0..<2 {
            let base = region == 0 ? Episode.userBase : Episode.kernelBase
            for i in 0..<Episode.pages {
                let gva = base + UInt64(i) * 0x1000
                let frame = rng.next() % 3 == 0 && !framesUsed.isEmpty
                    ? framesUsed.randomElement(using: &rng)!
                    : (rng.next() % 4 == 0 ? (Episode.mixedRegion >> 12) + rng.next() % 512
                                            : firstFrame + rng.next() % (lastFrame - firstFrame))
                if !framesUsed.contains(frame) { framesUsed.append(frame) }
                // The gap case on purpose: a supervisor-execute-only page at a user-mode address.
                if region == 0 && rng.next() % 3 == 0 && frame >= firstFrame {
                    policy[Int(frame)] = rng.next() % 2 == 0 ? [.read, .supervisorExecute] : [.supervisorExecute]
                }
                var flags: GuestPTE = []
                if rng.next() % 100 < 93 { flags.insert(.present) }
                let userish = region == 0 ? rng.next() % 10 != 0 : rng.next() % 10 == 0
                if userish { flags.insert(.user) }
                if rng.next() % 2 == 0 { flags.insert(.writable) }
                if rng.next() % 100 < 12 { flags.insert(.noExecute) }
                try pt.map(&image, gva: gva, gpa: frame << 12, flags: flags)
                codeAddresses.append(gva)
                dataAddresses.append(gva)
            }
        }
        // One 2 MiB guest page over the mixed block, at a user and a supervisor address.
        try pt.map(&image, gva: 0x4000_0000, gpa: Episode.mixedRegion, flags: [.present, .user, .writable, .large])
        try pt.map(&image, gva: Episode.kernelBase + 0x4000_0000, gpa: Episode.mixedRegion, flags: [.present, .writable, .large])
        for _ in 0..<8 {
            let off = (rng.next() % 512) << 12
            codeAddresses.append(0x4000_0000 + off)
            codeAddresses.append(Episode.kernelBase + 0x4000_0000 + off)
        }
        for frame in framesUsed.sorted() { fillCode(&image, frame: frame, rng: &rng) }
        for _ in 0..<8 { fillCode(&image, frame: (Episode.mixedRegion >> 12) + rng.next() % 512, rng: &rng) }

        // The two machines.
        let vm = try makeSimVM(ram: Episode.ram, mode: mode, budget: 1)
        defer { try? vm.destroy() }
        var ranges: [PolicyRange] = []
        for f in 0..<Int(lastFrame) where policy[f] != [.read, .write] {
            ranges.append(PolicyRange(start: GPA(UInt64(f) << 12), size: 0x1000, pageSize: .size4K, permissions: policy[f]))
        }
        if !ranges.isEmpty { try vm.setPolicy(ranges) }
        try image.load(into: vm)
        let cpu = try vm.makeVCPU(index: 0)
        let policyBox = PolicyBox(policy)
        var ref = ReferenceMachine(regs: Registers(), memory: image, ramSize: Episode.ram, policy: { policyBox.get($0) })

        func randomState(_ rng: inout SplitMix64) -> Registers {
            var r = Registers()
            r.cr0 = Registers.cr0PG
            r.cr3 = pt.cr3
            r.cr4 = smep ? Registers.cr4SMEP : 0
            r.efer = Registers.eferNXE
            r.cpl = rng.next() % 2 == 0 ? 0 : 3
            r.rip = codeAddresses.randomElement(using: &rng)! + (rng.next() % 512) * 8
            r.lstar = Episode.kernelBase + (rng.next() % UInt64(Episode.pages)) * 0x1000 + (rng.next() % 512) * 8
            r.faultHandler = rng.next() % 2 == 0 ? 0 : Episode.kernelBase + (rng.next() % UInt64(Episode.pages)) * 0x1000
            for i in 2...5 { r.gpr[i] = dataAddresses.randomElement(using: &rng)! }
            for i in 6...9 {
                switch rng.next() % 10 {
                case 0: r.gpr[i] = 0x0000_8000_0000_0000 | (rng.next() & 0xFFF8) // non-canonical
                case 1: r.gpr[i] = 0x7000_0000 + (rng.next() % 64) * 8           // not mapped
                default: r.gpr[i] = codeAddresses.randomElement(using: &rng)! + (rng.next() % 512) * 8
                }
            }
            // SYSRET returns to r1: mostly a user-mode address.
            r.gpr[1] = (rng.next() % 4 == 0 ? codeAddresses.randomElement(using: &rng)!
                                             : codeAddresses[Int(rng.next() % UInt64(Episode.pages))]) + (rng.next() % 512) * 8
            return r
        }

        var result = EpisodeResult()
        let start = randomState(&rng)
        try cpu.setRegisters(start)
        ref.regs = start
        var lastWasReturn = false
        for _ in 0..<maxSteps {
            // A policy change while the vCPU runs (between two of its instructions).
            if rng.next() % 400 == 0 {
                let f = firstFrame + rng.next() % (lastFrame - firstFrame)
                let p = Episode.pick(&rng)
                if rng.next() % 4 == 0 {
                    let base = f & ~511
                    try vm.setPolicy(PolicyRange(start: GPA(base << 12), size: 0x20_0000, pageSize: .size2M, permissions: p))
                    policyBox.set(range: Int(base)..<Int(base + 512), p)
                } else {
                    try vm.setPolicy(PolicyRange(start: GPA(f << 12), size: 0x1000, pageSize: .size4K, permissions: p))
                    policyBox.set(range: Int(f)..<Int(f + 1), p)
                }
                result.policyChangesWhileRunning += 1
            }
            let pre = ref.regs
            let activeBefore = cpu.active
            let exit = try cpu.run()
            guard let emu = ReferenceMachine.Outcome(exit) else {
                result.unclassified.append("seed \(seed): unexpected exit \(exit)")
                break
            }
            let truth = ref.step()
            result.steps += 1
            result.fetchesCompared += 1
            let fetchGPA = truth.fetchViolation?.gpa ?? emu.fetchViolation?.gpa
            if let g = fetchGPA, g >> 21 == Episode.mixedRegion >> 21 { result.fetchesInMixed2M += 1 }
            if lastWasReturn && pre.cpl == 3, let v = truth.fetchViolation, v.user,
               policyBox.get(v.gpa).contains(.supervisorExecute) && !policyBox.get(v.gpa).contains(.userExecute) {
                result.supervisorOnlyAtUserAddressAfterReturn += 1
            }
            let emuRegs = try cpu.registers()
            if emu == truth && emuRegs == ref.regs {
                lastWasReturn = pre.cpl == 0 && ref.regs.cpl == 3
                if truth.stopsProgress {
                    let s = randomState(&rng)
                    try cpu.setRegisters(s)
                    ref.regs = s
                }
                continue
            }
            // A divergence: classify it, then end the episode (the machines' states now differ).
            if let c = classify(pre: pre, active: activeBefore, emu: emu, truth: truth, policy: policyBox) {
                result.divergences[c, default: 0] += 1
            } else {
                result.unclassified.append("""
                    seed \(seed) mode \(mode) smep \(smep) step \(result.steps): rip \(hex(pre.rip)) cpl \(pre.cpl) \
                    active \(activeBefore): emulation \(emu) vs reference \(truth); \
                    regs equal: \(emuRegs == ref.regs)
                    """)
            }
            break
        }
        return result
    }

    func classify(pre: Registers, active: HierarchyID, emu: ReferenceMachine.Outcome,
                  truth: ReferenceMachine.Outcome, policy: PolicyBox) -> DivergenceClass? {
        if mode == .lazy, pre.cpl == 3, active == .supervisor, emu.fetched(at: pre.rip), let v = truth.fetchViolation, v.user {
            let p = policy.get(v.gpa)
            if p.contains(.supervisorExecute) && !p.contains(.userExecute) { return .lazyStaleSupervisor }
        }
        if !smep && pre.cpl == 0 {
            if emu.fetched(at: pre.rip), let v = truth.fetchViolation, v.user { return .smepOffUserAddress }
            if truth.fetched(at: pre.rip), let v = emu.fetchViolation, v.user { return .smepOffUserAddress }
            if mode == .exact, active == .user, emu.fetched(at: pre.rip), let v = truth.fetchViolation, !v.user {
                let p = policy.get(v.gpa)
                if p.contains(.userExecute) && !p.contains(.supervisorExecute) { return .smepOffUserHierarchyAtCPL0 }
            }
        }
        return nil
    }

    /// Fills a page with random instructions of the ISA (and a little garbage).
    func fillCode(_ image: inout GuestImage, frame: UInt64, rng: inout SplitMix64) {
        var a = Assembler(origin: frame << 12)
        let scratch: [UInt8] = [0, 10, 11]
        for _ in 0..<512 {
            let s = scratch[Int(rng.next() % 3)]
            switch rng.next() % 100 {
            case 0..<10: a.emit(.nop)
            case 10..<18: a.emit(.movi, s, 0, Int32(truncatingIfNeeded: rng.next()))
            case 18..<24: a.emit(.addi, s, 0, Int32(truncatingIfNeeded: rng.next() % 64))
            case 24..<28: a.emit(rng.next() % 2 == 0 ? .add : .sub, s, scratch[Int(rng.next() % 3)])
            case 28..<31: a.emit(.mov, s, UInt8(2 + rng.next() % 8))
            case 31..<41: a.emit(.load, s, UInt8(2 + rng.next() % 4), Int32((rng.next() % 512) * 8))
            case 41..<48: a.emit(.store, UInt8(2 + rng.next() % 4), s, Int32((rng.next() % 512) * 8))
            case 48..<56: a.emit(.jmp, 0, 0, Int32(Int64(rng.next() % 65) - 32) * 8)
            case 56..<61: a.emit(rng.next() % 2 == 0 ? .jz : .jnz, s, 0, Int32(Int64(rng.next() % 65) - 32) * 8)
            case 61..<68: a.emit(.jmpr, UInt8(6 + rng.next() % 4))
            case 68..<76: a.emit(.syscall)
            case 76..<84: a.emit(.sysret)
            case 84..<88: a.emit(.iret, UInt8(6 + rng.next() % 4))
            case 88..<92: a.emit(.out, s, 0, Int32(rng.next() % 4))
            case 92..<94: a.emit(.hlt)
            case 94..<96: a.emit(.load, s, UInt8(2 + rng.next() % 4), Int32(rng.next() % 4096)) // may be misaligned
            default:
                a.emit(Opcode.allCases.randomElement(using: &rng)!, UInt8(rng.next() % 18), UInt8(rng.next() % 18), 0)
            }
        }
        image.write(frame << 12, a.bytes)
    }
}

/// The policy both machines see (the reference reads it through a closure).
final class PolicyBox: @unchecked Sendable {
    private var p: [EPTPermissions]
    init(_ p: [EPTPermissions]) { self.p = p }
    func get(_ gpa: UInt64) -> EPTPermissions { Int(gpa >> 12) < p.count ? p[Int(gpa >> 12)] : .none }
    func set(range: Range<Int>, _ v: EPTPermissions) { for i in range { p[i] = v } }
}

/// Runs `episodes` random episodes for one configuration and checks the classes allowed there.
func differential(mode: VMConfig.MBECMode, smep: Bool, seeds: Range<UInt64>, stepsPerEpisode: Int,
                  allowed: Set<DivergenceClass>) throws -> EpisodeResult {
    var total = EpisodeResult()
    for s in seeds {
        let seed = s &* 0x9E37_79B9 ^ (mode == .exact ? 0 : 0x1000) ^ (smep ? 0 : 0x2000)
        let r = try Episode(seed: seed, mode: mode, smep: smep).run(maxSteps: stepsPerEpisode)
        total.steps += r.steps
        total.fetchesCompared += r.fetchesCompared
        total.policyChangesWhileRunning += r.policyChangesWhileRunning
        total.supervisorOnlyAtUserAddressAfterReturn += r.supervisorOnlyAtUserAddressAfterReturn
        total.fetchesInMixed2M += r.fetchesInMixed2M
        total.unclassified += r.unclassified
        for (c, n) in r.divergences { total.divergences[c, default: 0] += n }
    }
    #expect(total.unclassified.isEmpty, "unclassified divergences:\n\(total.unclassified.prefix(5).joined(separator: "\n"))")
    for (c, n) in total.divergences {
        #expect(allowed.contains(c), "divergence class \(c) (\(n)x) is not expected for mode \(mode), SMEP \(smep)")
    }
    print("differential \(mode) smep=\(smep): \(total.steps) steps, divergences \(total.divergences.map { "\($0.key.rawValue)=\($0.value)" }.sorted()), policy changes while running \(total.policyChangesWhileRunning), SX-only at user address after return \(total.supervisorOnlyAtUserAddressAfterReturn), violations in mixed 2M block \(total.fetchesInMixed2M)")
    return total
}

@Suite struct DifferentialTests {
    /// Seeds are split into chunks so the two cores run them in parallel; the suite as a whole runs
    /// over a million random steps.
    static let chunks: [Range<UInt64>] = (0..<8).map { UInt64($0 * 25)..<UInt64($0 * 25 + 25) }

    @Test("exact mode, SMEP on: identical to hardware MBEC", arguments: chunks)
    func exactWithSMEP(seeds: Range<UInt64>) throws {
        let r = try differential(mode: .exact, smep: true, seeds: seeds, stepsPerEpisode: 4000, allowed: [])
        #expect(r.divergences.isEmpty)
        #expect(r.steps > 25 * 1000, "episodes ended early: \(r.steps) steps")
        #expect(r.policyChangesWhileRunning > 0)
        #expect(r.supervisorOnlyAtUserAddressAfterReturn > 0, "the gap scenario never came up")
    }

    @Test("exact mode, SMEP off: only the SMEP-off classes", arguments: chunks.prefix(4))
    func exactWithoutSMEP(seeds: Range<UInt64>) throws {
        _ = try differential(mode: .exact, smep: false, seeds: seeds, stepsPerEpisode: 3000,
                             allowed: [.smepOffUserAddress, .smepOffUserHierarchyAtCPL0])
    }

    @Test("lazy mode (the patent's minimum exits), SMEP on: only the stale-supervisor class", arguments: chunks.prefix(4))
    func lazyWithSMEP(seeds: Range<UInt64>) throws {
        let r = try differential(mode: .lazy, smep: true, seeds: seeds, stepsPerEpisode: 3000, allowed: [.lazyStaleSupervisor])
        #expect((r.divergences[.lazyStaleSupervisor] ?? 0) > 0, "the documented lazy-mode gap never showed: the test lost its teeth")
    }

    @Test("lazy mode, SMEP off", arguments: chunks.prefix(2))
    func lazyWithoutSMEP(seeds: Range<UInt64>) throws {
        _ = try differential(mode: .lazy, smep: false, seeds: seeds, stepsPerEpisode: 3000,
                             allowed: [.lazyStaleSupervisor, .smepOffUserAddress])
    }
}
