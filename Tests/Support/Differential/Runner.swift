import MBECReference
import NPTCore
import NPTSimulator
import Synchronization

/// Both machines for one vCPU, kept in lockstep.
final class Pair {
    let config: DifferentialConfig
    let vm: VirtualMachine
    var cpu: VirtualCPU
    var ref: ReferenceMBEC
    let policy: PolicyBox
    let guest: Guest
    let index: UInt32
    /// The reference's state saved at a privileged-mode entry (nil: not in the mode).
    var refSaved: ReferenceCPU?
    var report = DifferentialReport()
    var lastWasReturn = false
    /// Set by a step that left the privileged mode and then ran the next instruction.
    var afterLeave: (ReferenceCPU, HierarchyID)?

    init(config: DifferentialConfig, vm: VirtualMachine, guest: Guest, policy: PolicyBox, index: UInt32) throws {
        self.config = config; self.vm = vm; self.guest = guest; self.policy = policy; self.index = index
        cpu = try vm.makeVCPU(index: index)
        report.vcpusCreated += 1
        ref = ReferenceMBEC(cpu: ReferenceCPU(), memory: guest.memory, policy: { [policy] in policy.get($0) })
    }

    func setState(_ s: ReferenceCPU) throws {
        try cpu.setRegisters(s.registers)
        ref.cpu = s
    }

    /// The reference's step, with the VMM's part of RSM (leave the mode, or #UD) and the step the
    /// emulation's loop takes after it.
    func referenceStep() -> ReferenceOutcome {
        let o = ref.step()
        guard o == .rsm else { return o }
        if let saved = refSaved {
            ref.cpu = saved
            refSaved = nil
            regionVisible(false)
            // What the next instruction starts from (for classifying a divergence there): the
            // restored state, under the hierarchy the core exposes for it.
            let paging = saved.cr0 & (1 << 31) != 0
            afterLeave = (saved, !paging || saved.cpl == 3 ? .user : .supervisor)
            // The emulation's loop takes the next step at once (an RSM there is outside the mode).
            let next = ref.step()
            return next == .rsm ? ref.inject(vector: 6, error: 0, address: ref.cpu.rip) : next
        }
        // RSM outside the mode: #UD, whose delivery is the step.
        return ref.inject(vector: 6, error: 0, address: ref.cpu.rip)
    }

    func regionVisible(_ v: Bool) {
        guard config.privilegedRegion else { return }
        let perms = v ? EPTPermissions.all.rawValue : 0
        for k in 0..<Layout.regionPages { policy.set(frame: (Layout.region >> 12) + k, perms) }
    }

    /// One step of both; returns the outcomes and whether they agree (outcome, registers, writes).
    func step() throws -> (emu: ReferenceOutcome?, truth: ReferenceOutcome, agree: Bool, pre: ReferenceCPU, active: HierarchyID) {
        var pre = ref.cpu
        var active = cpu.active
        afterLeave = nil
        let x = try cpu.run()
        let emu = ReferenceOutcome(x)
        let truth = referenceStep()
        if let a = afterLeave { (pre, active) = a }
        report.steps += 1
        var agree = emu == truth
        if agree {
            let regs = try cpu.registers()
            agree = regs == ref.cpu.registers
        }
        if agree {
            for g in ref.writes {
                var v: UInt64 = 0
                try withUnsafeMutableBytes(of: &v) { try vm.readMemory(GPA(g), $0) }
                if v != ref.memory.read(g) { agree = false; break }
            }
        }
        count(pre: pre, truth: truth)
        return (emu, truth, agree, pre, active)
    }

    func count(pre: ReferenceCPU, truth: ReferenceOutcome) {
        if pre.cr0 & (1 << 31) == 0 { report.pagingOffSteps += 1 }
        if pre.cr0 & (1 << 16) == 0 { report.wpOffSteps += 1 }
        if pre.efer & (1 << 11) == 0 { report.nxeOffSteps += 1 }
        if pre.cr4 & (1 << 21) != 0 { report.smapSteps += 1 }
        if pre.rip >> 39 & 0x1FF == 1 { report.largePageSteps += 1 }
        if case .violation(_, _, let q) = truth, q & (1 << 8) == 0 {
            report.structureViolations += 1
            if q & 2 != 0 { report.accessedDirtyViolations += 1 }
        }
        if case .guestFault(14, let e, _) = truth, e & 8 != 0 { report.reservedBitFaults += 1 }
        if let g = ref.storedTo {
            if guest.tables.contains(g & ~0xFFF) { report.pageTableWrites += 1 }
            if g >= Layout.nvdimm && g < Layout.nvdimm + Layout.nvdimmPages * 0x1000 { report.nvdimmAccesses += 1 }
        }
        if lastWasReturn && pre.cpl == 3, let v = truth.fetchViolation, v.user {
            let p = EPTPermissions(rawValue: policy.get(v.gpa))
            if p.contains(.supervisorExecute) && !p.contains(.userExecute) { report.supervisorOnlyAtUserAddressAfterReturn += 1 }
        }
    }

    /// The documented class a divergence belongs to, if any.
    func classify(pre: ReferenceCPU, active: HierarchyID, emu: ReferenceOutcome, truth: ReferenceOutcome) -> DivergenceClass? {
        let emuRan = emu.fetched(pre), truthRan = truth.fetched(pre)
        let paging = pre.cr0 & (1 << 31) != 0
        guard paging else { return nil }
        func perms(_ g: UInt64) -> EPTPermissions { EPTPermissions(rawValue: policy.get(g)) }
        let mode = config.mode
        // CPL 3 under the supervisor hierarchy (no return exit): an Xs-only page at a user address runs.
        if mode != .exact, pre.cpl == 3, active == .supervisor, emuRan, let v = truth.fetchViolation, v.user {
            let p = perms(v.gpa)
            if p.contains(.supervisorExecute) && !p.contains(.userExecute) { return .staleSupervisorAtCPL3 }
        }
        if pre.cpl == 0 && !config.smep {
            if emuRan, let v = truth.fetchViolation, v.user { return .smepOffUserAddress }
            if truthRan, let v = emu.fetchViolation, v.user { return .smepOffUserAddress }
        }
        // CPL 0 under the user hierarchy at a supervisor address: an Xu-only page runs.
        if pre.cpl == 0, active == .user, emuRan, let v = truth.fetchViolation, !v.user {
            let p = perms(v.gpa)
            if p.contains(.userExecute) && !p.contains(.supervisorExecute) {
                if mode == .violationOnly { return .staleUserAtCPL0 }
                if mode == .exact && !config.smep { return .smepOffUserHierarchyAtCPL0 }
            }
        }
        return nil
    }

    /// After a divergence: RAM takes the reference's contents, NVDIMM pages (which the host may not
    /// write) give theirs to the reference, and a fresh vCPU starts from the reference's registers.
    func resync() throws {
        if refSaved != nil {
            try cpu.leavePrivileged()
            ref.cpu = refSaved!
            refSaved = nil
            regionVisible(false)
        }
        try vm.removeVCPU(cpu)
        for f in guest.watched.sorted() where !(f >= Layout.region >> 12 && f < (Layout.region >> 12) + Layout.regionPages) {
            let g = f << 12
            var page = [UInt8](repeating: 0, count: 4096)
            try page.withUnsafeMutableBytes { try vm.readMemory(GPA(g), $0) }
            for i in 0..<512 {
                var w: UInt64 = 0
                for k in 0..<8 { w |= UInt64(page[i * 8 + k]) << (8 * UInt64(k)) }
                let r = ref.memory.read(g + UInt64(i * 8))
                guard w != r else { continue }
                if f < Layout.ramFrames {
                    try withUnsafeBytes(of: r) { try vm.writeMemory(GPA(g + UInt64(i * 8)), $0) }
                } else {
                    ref.memory.write(g + UInt64(i * 8), w)
                }
            }
        }
        cpu = try vm.makeVCPU(index: index)
        report.vcpusCreated += 1
        try cpu.setRegisters(ref.cpu.registers)
    }
}

package enum Differential {
    /// Runs one single-vCPU episode of `steps` steps.
    package static func episode(_ config: DifferentialConfig, seed: UInt64, steps: Int) throws -> DifferentialReport {
        var rng = Rand(seed: seed)
        let guest = Guest(rng: &rng, frames: Layout.firstFrame..<Layout.ramFrames, tableBase: 0,
                          nvdimm: config.nvdimm, region: config.privilegedRegion)
        let reg = BackendRegistry()
        try reg.register(SimulatorBackend(name: "sim", withoutExits: config.withoutExits), makeDefault: true)
        let vm = try VirtualMachine(config: VMConfig(ramSize: Layout.ram, defaultPermissions: [.read, .write],
                                                     mbecMode: config.mode, maxStepsPerRun: 1), registry: reg)
        defer { try? vm.destroy() }
        let policy = PolicyBox(ram: guest.ramPolicy)
        try load(guest, into: vm, policy: policy, config: config)
        let pair = try Pair(config: config, vm: vm, guest: guest, policy: policy, index: 0)
        try pair.setState(guest.randomState(&rng, smep: config.smep))
        try run(pair, steps: steps, rng: &rng)
        return pair.report
    }

    static func load(_ guest: Guest, into vm: VirtualMachine, policy: PolicyBox, config: DifferentialConfig) throws {
        var ranges: [PolicyRange] = []
        for (f, p) in guest.ramPolicy.enumerated() where p != EPTPermissions([.read, .write]).rawValue {
            ranges.append(PolicyRange(start: GPA(UInt64(f) << 12), size: 0x1000, pageSize: .size4K, permissions: EPTPermissions(rawValue: p)))
        }
        for f in guest.memory.frames where f < Layout.ramFrames {
            var bytes = [UInt8](repeating: 0, count: 4096)
            for i in 0..<512 {
                let w = guest.memory.read(f << 12 + UInt64(i * 8))
                for k in 0..<8 { bytes[i * 8 + k] = UInt8(truncatingIfNeeded: w >> (8 * UInt64(k))) }
            }
            try vm.writeMemory(GPA(f << 12), bytes: bytes)
        }
        if config.nvdimm {
            _ = try vm.addNVDIMM(gpa: GPA(Layout.nvdimm), size: Layout.nvdimmPages * 0x1000, hostRegion: 1, regionOffset: 0)
            for k in 0..<Layout.nvdimmPages {
                let g = Layout.nvdimm + k * 0x1000
                let p = guest.otherPolicy[g >> 12] ?? 0
                policy.set(frame: g >> 12, p)
                ranges.append(PolicyRange(start: GPA(g), size: 0x1000, pageSize: .size4K, permissions: EPTPermissions(rawValue: p)))
            }
        }
        if !ranges.isEmpty { try vm.setPolicy(ranges) }
        if config.privilegedRegion {
            var contents = [UInt8](repeating: 0, count: Int(Layout.regionPages * 0x1000))
            for i in 0..<(contents.count / 8) {
                let w = guest.memory.read(Layout.region + UInt64(i * 8))
                for k in 0..<8 { contents[i * 8 + k] = UInt8(truncatingIfNeeded: w >> (8 * UInt64(k))) }
            }
            try vm.defineRegion(start: GPA(Layout.region), size: Layout.regionPages * 0x1000, contents: contents,
                                entryOffset: Layout.regionEntry)
        }
    }

    static func run(_ pair: Pair, steps: Int, rng: inout Rand) throws {
        let config = pair.config
        var done = 0
        while done < steps {
            // A policy change while the vCPU runs (between two of its instructions).
            if rng.below(300) == 0 { try changePolicy(pair, rng: &rng) }
            // A VMM-injected interrupt.
            if rng.below(400) == 0 && pair.ref.cpu.faultHandler != 0 && pair.refSaved == nil {
                let vector: UInt32 = rng.pick([20, 32, 14, 3])
                let err = rng.below(32), addr = rng.next()
                try pair.cpu.injectFault(vector: vector, errorCode: err, address: addr)
                _ = pair.ref.inject(vector: vector, error: err, address: addr)
                let x = try pair.cpu.run()   // the delivery was this step: the run retires nothing
                pair.report.injections += 1
                let regs = try pair.cpu.registers()
                if x.reason != .budget || regs != pair.ref.cpu.registers {
                    pair.report.unclassified.append("\(config.name): injected vector \(vector): emulation \(x) vs reference state differs")
                    try pair.resync()
                }
                continue
            }
            // A privileged-mode entry.
            if config.privilegedRegion && pair.refSaved == nil && rng.below(700) == 0 {
                try pair.cpu.raisePrivileged()
                pair.refSaved = pair.ref.cpu
                var e = pair.ref.cpu
                e.cpl = 0
                e.cr0 = 0
                e.rip = Layout.region + Layout.regionEntry
                e.gpr[0] = UInt64(pair.index)
                pair.ref.cpu = e
                pair.regionVisible(true)
                pair.report.privilegedEntries += 1
            }
            // Now and then a fresh machine state (more of the generator's combinations per episode).
            if rng.below(250) == 0 && pair.refSaved == nil { try pair.setState(pair.guest.randomState(&rng, smep: config.smep)) }
            let r = try pair.step()
            done += 1
            if r.agree {
                pair.lastWasReturn = r.pre.cpl == 0 && pair.ref.cpu.cpl == 3
                if r.truth.stopsProgress { try recover(pair, r.truth, rng: &rng) }
                continue
            }
            guard let emu = r.emu else {
                pair.report.unclassified.append("\(config.name) step \(pair.report.steps): unexpected exit from the emulation")
                try pair.resync()
                continue
            }
            if let c = pair.classify(pre: r.pre, active: r.active, emu: emu, truth: r.truth), config.allowed.contains(c) {
                pair.report.divergences[c, default: 0] += 1
                // A documented class tends to repeat instruction after instruction: go on elsewhere.
                if rng.chance(50) {
                    try pair.resync()
                    if pair.refSaved == nil { try pair.setState(pair.guest.randomState(&rng, smep: config.smep)) }
                    continue
                }
            } else {
                let regs = try pair.cpu.registers()
                pair.report.unclassified.append("""
                    \(config.name) step \(pair.report.steps): rip \(hex(r.pre.rip)) cpl \(r.pre.cpl) cr0 \(hex(r.pre.cr0)) \
                    cr4 \(hex(r.pre.cr4)) efer \(hex(r.pre.efer)) active \(r.active) in mode \(pair.refSaved != nil): \
                    emulation \(emu) vs reference \(r.truth); registers equal \(regs == pair.ref.cpu.registers)
                    """)
            }
            try pair.resync()
            // The reference did not move on: go elsewhere, or the same divergence repeats.
            if r.truth.stopsProgress { try recover(pair, r.truth, rng: &rng) }
        }
        if pair.refSaved != nil { try pair.resync() }
    }

    /// After a violation, a fault without handler or a halt: the VMM injects #VE (if the guest has a
    /// handler and is outside the mode) or starts the vCPU somewhere else.
    static func recover(_ pair: Pair, _ o: ReferenceOutcome, rng: inout Rand) throws {
        if pair.refSaved != nil {
            try pair.cpu.leavePrivileged()
            pair.ref.cpu = pair.refSaved!
            pair.refSaved = nil
            pair.regionVisible(false)
            return
        }
        if case .violation(_, let gla, let q) = o, pair.ref.cpu.faultHandler != 0, rng.chance(50) {
            try pair.cpu.injectFault(vector: 20, errorCode: q, address: gla)
            _ = pair.ref.inject(vector: 20, error: q, address: gla)
            _ = try pair.cpu.run()
            pair.report.injections += 1
            let regs = try pair.cpu.registers()
            if regs != pair.ref.cpu.registers {
                pair.report.unclassified.append("\(pair.config.name): #VE injection left different states")
                try pair.resync()
            }
            return
        }
        try pair.setState(pair.guest.randomState(&rng, smep: pair.config.smep))
    }

    static func changePolicy(_ pair: Pair, rng: inout Rand) throws {
        let p = PolicyChoice.pick(&rng)
        let choice = rng.below(10)
        if choice == 0 && pair.config.nvdimm {
            let g = Layout.nvdimm + rng.below(Layout.nvdimmPages) * 0x1000
            try pair.vm.setPolicy(PolicyRange(start: GPA(g), size: 0x1000, pageSize: .size4K, permissions: p))
            pair.policy.set(frame: g >> 12, p.rawValue)
        } else if choice == 1 {
            let t = rng.pick(pair.guest.tables)
            let q: EPTPermissions = rng.chance(70) ? [.read, .write] : .read
            try pair.vm.setPolicy(PolicyRange(start: GPA(t), size: 0x1000, pageSize: .size4K, permissions: q))
            pair.policy.set(frame: t >> 12, q.rawValue)
        } else if choice == 2 {
            let base = (Layout.firstFrame + rng.below(Layout.ramFrames - Layout.firstFrame)) & ~511
            guard base >= Layout.firstFrame else { return }
            try pair.vm.setPolicy(PolicyRange(start: GPA(base << 12), size: 0x20_0000, pageSize: .size2M, permissions: p))
            for f in base..<(base + 512) { pair.policy.set(frame: f, p.rawValue) }
        } else {
            let f = Layout.firstFrame + rng.below(Layout.ramFrames - Layout.firstFrame)
            try pair.vm.setPolicy(PolicyRange(start: GPA(f << 12), size: 0x1000, pageSize: .size4K, permissions: p))
            pair.policy.set(frame: f, p.rawValue)
        }
        pair.report.policyChanges += 1
    }
}
