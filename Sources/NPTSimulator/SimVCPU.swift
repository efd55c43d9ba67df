import NPTCore
import Synchronization

/// One simulated vCPU. Driven by one thread at a time (the core guarantees it); invalidations may be
/// posted from any thread and are applied before the next instruction.
final class SimVCPU: BackendVCPU, @unchecked Sendable {
    let vm: SimVM
    let index: UInt32
    private var regs = Registers()
    private var tlb = TLB()
    private var active: HierarchyID = .supervisor
    private var controls: ExitControls = []
    private var snapshot: ShadowSnapshot
    private let pendingFlag = Atomic<Bool>(false)
    private let kickFlag = Atomic<Bool>(false)
    private let pending = NPTMutex<[Invalidation]>([])
    private var pendingExit: VMExit?
    private var slice: UInt64 = 0
    private var retired: UInt64 = 0
    /// The counters as other threads read them (npt_vm_get_stats while the vCPU runs): written
    /// only by the driving thread after each instruction and exit, read with relaxed loads.
    private let publishedInstructions = Atomic<UInt64>(0)
    private let publishedHits = Atomic<UInt64>(0)
    private let publishedMisses = Atomic<UInt64>(0)
    /// Guest RAM's backing; host offsets past `ramSize` are in the VM's segments.
    private let ram: UnsafeMutableRawPointer
    private let ramSize: UInt64
    private var segments: [Segment] = []
    private var segmentsVersion: UInt64 = .max
    /// The last exit was a write violation the core may emulate (`completeTrappedWrite`).
    private var trappedWrite = false
    /// Guest-physical frame of the last successful translation.
    private var lastGPAFrame: UInt64 = 0
    /// Backing offsets from here up are devices (region, vFHA, NVDIMM), not RAM.
    private let deviceBase: UInt64
    private var id: ObjectIdentifier { ObjectIdentifier(self) }

    init(vm: SimVM, index: UInt32) {
        self.vm = vm
        self.index = index
        self.snapshot = vm.hierarchies.currentSnapshot()
        self.ram = vm.ram.base
        self.ramSize = vm.ram.size
        self.deviceBase = vm.regionWindow
    }

    func fence() throws(NPTError) { vm.platform.fence(cpu: id) }

    func completeTrappedWrite() throws(NPTError) {
        guard trappedWrite else { throw NPTError(.state, "vCPU \(index): the last exit was not a trapped write") }
        trappedWrite = false
        regs.rip &+= 8
        retired += 1
        slice += 1
        publishCounters()
        vm.platform.flushHintWritten(cpu: id)
    }

    /// A store that reached backing memory past RAM: persistent memory or the vFHA's scratch page.
    private func deviceStore(_ h: UInt64, _ value: UInt64) {
        if h & ~0xFFF == vm.flushHintHost.load(ordering: .relaxed) {
            vm.untrapped.wrappingAdd(1, ordering: .relaxed)
            vm.platform.flushHintWritten(cpu: id)
        } else if let spa = vm.pmemSPA(h) {
            vm.platform.store(cpu: id, spa: spa, value: value, lineBase: backing(h & ~63))
        }
    }

    // MARK: BackendVCPU

    func registers() throws(NPTError) -> Registers { regs }

    func setRegisters(_ r: Registers) throws(NPTError) {
        guard r.gpr.count == 16 else { throw .invalid("gpr must have 16 registers") }
        if r.cr3 != regs.cr3 || r.cr0 != regs.cr0 || r.cr4 != regs.cr4 || r.efer != regs.efer { tlb.flushAll() }
        regs = r
        pendingExit = nil   // an exit of the replaced state (e.g. an injected fault's) no longer applies
    }

    func expose(_ h: HierarchyID) throws(NPTError) { active = h }
    func setExitControls(_ c: ExitControls) throws(NPTError) {
        if c.contains(.escalation) && !vm.capabilities.contains(.exitOnEscalation) {
            throw .unsupported("this simulator has no exit on escalation")
        }
        if c.contains(.returnToUser) && !vm.capabilities.contains(.exitOnReturn) {
            throw .unsupported("this simulator has no exit on return to user mode")
        }
        controls = c
    }

    func injectFault(vector: UInt32, errorCode: UInt64, address: UInt64) throws(NPTError) {
        guard regs.faultHandler != 0 else {
            throw NPTError(.state, "the guest has no fault handler (regs.fault_handler is 0)")
        }
        if let x = deliver(vector: vector, error: errorCode, address: address) { pendingExit = finish(x) }
    }

    /// The counters as last published by the thread that runs the vCPU (readable from any
    /// thread while it runs: issue 11 row 8).
    var counters: (instructions: UInt64, tlbHits: UInt64, tlbMisses: UInt64) {
        (publishedInstructions.load(ordering: .relaxed), publishedHits.load(ordering: .relaxed), publishedMisses.load(ordering: .relaxed))
    }
    func backendStatistics() throws(NPTError) -> [BackendStatistic] {
        let c = counters
        return [BackendStatistic(name: BackendStatistic.instructions, value: c.instructions),
                BackendStatistic(name: BackendStatistic.tlbHits, value: c.tlbHits),
                BackendStatistic(name: BackendStatistic.tlbMisses, value: c.tlbMisses)]
    }

    @inline(__always) private func publishCounters() {
        publishedInstructions.store(retired, ordering: .relaxed)
        publishedHits.store(tlb.hits, ordering: .relaxed)
        publishedMisses.store(tlb.misses, ordering: .relaxed)
    }

    func kick() { kickFlag.store(true, ordering: .releasing) }

    func destroy() { vm.remove(self) }

    func post(_ inv: Invalidation) {
        pending.withLock { $0.append(inv) }
        pendingFlag.store(true, ordering: .releasing)
    }

    private func drain() {
        guard pendingFlag.load(ordering: .relaxed) && pendingFlag.exchange(false, ordering: .acquiring) else {
            // Translations added (a published snapshot without invalidations) need no flush, only
            // the new snapshot.
            if vm.hierarchies.publishedGeneration != snapshot.generation { snapshot = vm.hierarchies.currentSnapshot() }
            return
        }
        let invs = pending.withLock { q -> [Invalidation] in let x = q; q.removeAll(); return x }
        snapshot = vm.hierarchies.currentSnapshot()
        for inv in invs { tlb.flush(tag: inv.hierarchy.rawValue, range: inv.range) }
    }

    func run() throws(NPTError) -> VMExit {
        trappedWrite = false
        if let p = pendingExit { pendingExit = nil; return p }
        let budget = vm.config.maxStepsPerRun
        while true {
            drain()
            if kickFlag.load(ordering: .relaxed) && kickFlag.exchange(false, ordering: .acquiring) {
                return finish(VMExit(reason: .kicked))
            }
            if budget > 0 && slice >= budget {
                return finish(VMExit(reason: .budget))
            }
            if let x = step() { return finish(x) }
        }
    }

    private func finish(_ x: VMExit) -> VMExit {
        publishCounters()
        var x = x
        switch x.reason {
        case .escalation, .returnToUser, .eptViolation, .kicked, .leaveMode: break
        default: slice = 0
        }
        x.cpl = regs.cpl
        x.hierarchy = active
        x.rip = regs.rip
        return x
    }

    // MARK: translation

    enum Access { case fetch, read, write }
    enum Translated { case ok(UInt64), fault(UInt32, UInt64), exit(VMExit) }

    private static let addrMask: UInt64 = 0x000F_FFFF_FFFF_F000

    /// Backing memory at host offset `h` (an 8-byte access, 8-byte aligned: within one page).
    @inline(__always) private func backing(_ h: UInt64) -> UnsafeMutableRawPointer {
        h < ramSize ? ram + Int(h) : deviceHost(h)
    }

    /// Past RAM: the segment holding `h` (a copy refreshed when the VM's list changes; the copy
    /// keeps a replaced segment's memory alive until then). Nothing maps backing that does not
    /// exist; if it were reached, the VM's void page takes the access.
    @inline(never) private func deviceHost(_ h: UInt64) -> UnsafeMutableRawPointer {
        let v = vm.segmentsVersion.load(ordering: .acquiring)
        if v != segmentsVersion { segments = vm.segments; segmentsVersion = v }
        for s in segments where s.contains(h, 8) { return s.mem.base + Int(h - s.start) }
        return vm.voidPage.base + Int(h & 0xFF8)
    }

    @inline(__always) private func phys64(_ hostOffset: UInt64) -> UInt64 {
        backing(hostOffset).loadUnaligned(as: UInt64.self)
    }

    /// An EPT violation exit. `translation`: the access was to the translation of the linear address
    /// (qualification bit 8; with bits 9-11 from the guest paging), not to a paging-structure entry.
    private func violation(_ access: Access, gpa: UInt64, gva: UInt64, nested: ShadowPermissions,
                           translation: Bool, entry: TLB.Entry? = nil) -> VMExit {
        var q: ViolationQualification = [.linearValid]
        switch access { case .fetch: q.insert(.fetch); case .read: q.insert(.read); case .write: q.insert(.write) }
        if nested.contains(.read) { q.insert(.readable) }
        if nested.contains(.write) { q.insert(.writable) }
        if nested.contains(.execute) { q.insert(.executable) }
        if translation, let entry {
            q.insert(.linearTranslation)
            if vm.capabilities.contains(.linearModeInfo) {
                if entry.guestUser { q.insert(.userLinear) }
                if entry.guestWritable { q.insert(.linearWritable) }
                if entry.guestNX { q.insert(.linearExecuteDisable) }
            }
        }
        var x = VMExit(reason: .eptViolation)
        x.gpa = GPA(gpa); x.gva = GVA(gva); x.qualification = q.rawValue
        return x
    }

    /// The #PF error code (SDM 4.7): I/D only when SMEP or NXE is on.
    private func pfError(_ access: Access, present: Bool, reserved: Bool = false) -> UInt64 {
        var e: UInt64 = present ? 1 : 0
        if access == .write { e |= 2 }
        if regs.cpl == 3 { e |= 4 }
        if reserved { e |= 8 }
        if access == .fetch && (regs.cr4 & Registers.cr4SMEP != 0 || regs.efer & Registers.eferNXE != 0) { e |= 16 }
        return e
    }

    /// Reserved bits of a guest paging-structure entry (MAXPHYADDR 52): PS in a PML4E, bits 29:13 of
    /// a 1 GiB PDPTE, bits 20:13 of a 2 MiB PDE, XD while NXE is off.
    @inline(__always) private func reservedBits(_ pte: UInt64, level: Int, nxe: Bool) -> Bool {
        if !nxe && pte >> 63 != 0 { return true }
        switch level {
        case 4: return pte & 0x80 != 0
        case 3: return pte & 0x80 != 0 && pte & 0x3FFF_E000 != 0
        case 2: return pte & 0x80 != 0 && pte & 0x1F_E000 != 0
        default: return false
        }
    }

    /// The paging-structure entries one walk used: guest-physical address, backing offset, value.
    private struct Walk {
        var gpa: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
        var host: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
        var value: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
        var count = 0
        mutating func append(_ g: UInt64, _ h: UInt64, _ v: UInt64) {
            switch count {
            case 0: gpa.0 = g; host.0 = h; value.0 = v
            case 1: gpa.1 = g; host.1 = h; value.1 = v
            case 2: gpa.2 = g; host.2 = h; value.2 = v
            default: gpa.3 = g; host.3 = h; value.3 = v
            }
            count += 1
        }
        func at(_ i: Int) -> (gpa: UInt64, host: UInt64, value: UInt64) {
            switch i {
            case 0: (gpa.0, host.0, value.0)
            case 1: (gpa.1, host.1, value.1)
            case 2: (gpa.2, host.2, value.2)
            default: (gpa.3, host.3, value.3)
            }
        }
    }

    /// The processor's write of accessed/dirty flags into a paging-structure entry: a write the
    /// exposed hierarchy must permit (an EPT violation with bit 8 clear otherwise).
    private func setFlags(_ bits: UInt64, entryGPA: UInt64, gva: UInt64) -> VMExit? {
        let t = snapshot.translate(GPA(entryGPA), in: active)
        guard t.permissions.contains(.write) else {
            return violation(.write, gpa: entryGPA, gva: gva, nested: t.permissions, translation: false)
        }
        let h = t.hostOffset.raw + (entryGPA - t.pageBase.raw)
        backing(h).storeBytes(of: phys64(h) | bits, as: UInt64.self)
        return nil
    }

    /// Guest paging's access rights (SDM 4.6.1) for `access` at the current CPL.
    @inline(__always) private func guestAllows(_ e: TLB.Entry, _ access: Access) -> Bool {
        if regs.cpl == 3 {
            switch access {
            case .read: return e.guestUser
            case .write: return e.guestUser && e.guestWritable
            case .fetch: return e.guestUser && !e.guestNX
            }
        }
        let smap = e.guestUser && regs.cr4 & Registers.cr4SMAP != 0 && regs.rflags & Registers.rflagsAC == 0
        switch access {
        case .read: return !smap
        case .write: return !smap && (e.guestWritable || regs.cr0 & Registers.cr0WP == 0)
        case .fetch: return !(e.guestUser && regs.cr4 & Registers.cr4SMEP != 0) && !e.guestNX
        }
    }

    /// Translates linear address `la` for `access`: guest paging (with its access rights and
    /// accessed/dirty flags), then the exposed hierarchy. With paging off the linear address is the
    /// guest-physical one and, for MBEC, a user-mode address (writable, executable).
    func translate(_ la: UInt64, _ access: Access) -> Translated {
        let paging = regs.cr0 & Registers.cr0PG != 0
        let vpn = la >> 12
        let tag = active.rawValue
        var e: TLB.Entry
        if let hit = tlb.lookup(vpn: vpn, tag: tag) {
            e = hit
            if paging {
                guard guestAllows(e, access) else { return .fault(Vector.pageFault, pfError(access, present: true)) }
                if access == .write && !e.dirty {
                    if let x = setFlags(1 << 6, entryGPA: e.leaf, gva: la) { return .exit(x) }
                    e.dirty = true
                    tlb.setDirty(vpn: vpn, tag: tag)
                }
            }
        } else {
            e = TLB.Entry(valid: true, tag: tag, vpn: vpn)
            var gpa: UInt64
            if !paging {
                gpa = la
                e.guestUser = true; e.guestWritable = true; e.guestNX = false
            } else {
                let top = la >> 47
                guard top == 0 || top == 0x1FFFF else { return .fault(Vector.generalProtection, 0) }
                var table = regs.cr3 & SimVCPU.addrMask
                var user = true, writable = true, nx = false
                let nxe = regs.efer & Registers.eferNXE != 0
                var walk = Walk()
                gpa = 0
                var level = 4
                while true {
                    let shift = UInt64(12 + 9 * (level - 1))
                    let pteGPA = table + ((la >> shift) & 511) * 8
                    switch level {
                    case 4: e.walk.0 = pteGPA >> 12
                    case 3: e.walk.1 = pteGPA >> 12
                    case 2: e.walk.2 = pteGPA >> 12
                    default: e.walk.3 = pteGPA >> 12
                    }
                    let t = snapshot.translate(GPA(pteGPA), in: active)
                    guard t.permissions.contains(.read) else {
                        return .exit(violation(.read, gpa: pteGPA, gva: la, nested: t.permissions, translation: false))
                    }
                    let h = t.hostOffset.raw + (pteGPA - t.pageBase.raw)
                    let pte = phys64(h)
                    if pte & 1 == 0 { return .fault(Vector.pageFault, pfError(access, present: false)) }
                    if reservedBits(pte, level: level, nxe: nxe) {
                        return .fault(Vector.pageFault, pfError(access, present: true, reserved: true))
                    }
                    walk.append(pteGPA, h, pte)
                    user = user && pte & 4 != 0
                    writable = writable && pte & 2 != 0
                    nx = nx || (nxe && pte >> 63 != 0)
                    if level == 1 || (level <= 3 && pte & 0x80 != 0) {
                        let mask = (UInt64(1) << shift) - 1
                        gpa = (pte & SimVCPU.addrMask & ~mask) | (la & mask)
                        break
                    }
                    table = pte & SimVCPU.addrMask
                    level -= 1
                }
                e.guestUser = user; e.guestWritable = writable; e.guestNX = nx
                guard guestAllows(e, access) else { return .fault(Vector.pageFault, pfError(access, present: true)) }
                // Accessed flags on every entry used, and the dirty flag of the leaf on a write.
                for i in 0..<walk.count {
                    let w = walk.at(i)
                    var bits: UInt64 = 1 << 5
                    if i == walk.count - 1 && access == .write { bits |= 1 << 6 }
                    if w.value & bits == bits { continue }
                    if let x = setFlags(bits, entryGPA: w.gpa, gva: la) { return .exit(x) }
                }
                let leaf = walk.at(walk.count - 1)
                e.leaf = leaf.gpa
                e.dirty = access == .write || leaf.value & (1 << 6) != 0
            }
            let page = gpa & ~0xFFF
            let t = snapshot.translate(GPA(page), in: active)
            e.gpaPage = page
            e.nested = t.permissions
            e.hostPage = t.hostOffset.raw + (page - t.pageBase.raw)
            if t.present { tlb.insert(e) }
        }
        let need: ShadowPermissions = access == .fetch ? .execute : access == .read ? .read : .write
        guard e.nested.contains(need) else {
            return .exit(violation(access, gpa: e.gpaPage | (la & 0xFFF), gva: la, nested: e.nested,
                                   translation: true, entry: e))
        }
        lastGPAFrame = e.gpaPage >> 12
        return .ok(e.hostPage | (la & 0xFFF))
    }

    // MARK: execution

    /// Delivers a fault to the guest's handler; returns an exit when there is none, or when the
    /// delivery is an escalation the core asked to see.
    private func deliver(vector: UInt32, error: UInt64, address: UInt64) -> VMExit? {
        if regs.faultHandler == 0 {
            var x = VMExit(reason: .guestFault)
            x.vector = vector; x.qualification = error; x.gva = GVA(address)
            return x
        }
        let prev = regs.cpl
        regs.gpr[12] = UInt64(prev)
        regs.gpr[13] = UInt64(vector)
        regs.gpr[14] = error
        regs.gpr[15] = regs.rip
        regs.cr2 = address
        regs.cpl = 0
        regs.rip = regs.faultHandler
        slice += 1
        if prev == 3 && controls.contains(.escalation) { return VMExit(reason: .escalation) }
        return nil
    }

    private func fault(_ v: UInt32, _ err: UInt64, _ addr: UInt64) -> VMExit? { deliver(vector: v, error: err, address: addr) }

    /// Executes one instruction. Returns an exit, or nil to go on.
    func step() -> VMExit? {
        let rip = regs.rip
        if rip & 7 != 0 { return fault(Vector.generalProtection, 0, rip) }
        let host: UInt64
        switch translate(rip, .fetch) {
        case .ok(let h): host = h
        case .fault(let v, let err): return fault(v, err, rip)
        case .exit(let x): return x
        }
        let word = phys64(host)
        let opByte = UInt8(truncatingIfNeeded: word)
        let a = Int((word >> 8) & 0xFF), b = Int((word >> 16) & 0xFF)
        let imm = Int64(Int32(bitPattern: UInt32(truncatingIfNeeded: word >> 32)))
        guard let op = Opcode(rawValue: opByte), a < 16, b < 16 else {
            return fault(Vector.undefinedOpcode, 0, rip)
        }
        var next = rip &+ 8
        var exit: VMExit?
        switch op {
        case .nop: break
        case .movi: regs.gpr[a] = UInt64(bitPattern: imm)
        case .movhi: regs.gpr[a] = (regs.gpr[a] & 0xFFFF_FFFF) | (UInt64(UInt32(truncatingIfNeeded: imm)) << 32)
        case .mov: regs.gpr[a] = regs.gpr[b]
        case .add: regs.gpr[a] = regs.gpr[a] &+ regs.gpr[b]
        case .sub: regs.gpr[a] = regs.gpr[a] &- regs.gpr[b]
        case .addi: regs.gpr[a] = regs.gpr[a] &+ UInt64(bitPattern: imm)
        case .load, .store:
            let la = (op == .load ? regs.gpr[b] : regs.gpr[a]) &+ UInt64(bitPattern: imm)
            if la & 7 != 0 { return fault(Vector.generalProtection, 0, la) }
            switch translate(la, op == .load ? .read : .write) {
            case .ok(let h):
                if op == .load { regs.gpr[a] = phys64(h) }
                else {
                    backing(h).storeBytes(of: regs.gpr[b], as: UInt64.self)
                    if h >= deviceBase { deviceStore(h, regs.gpr[b]) }
                    tlb.storeTo(frame: lastGPAFrame)
                }
            case .fault(let v, let err): return fault(v, err, la)
            case .exit(let x):
                trappedWrite = op == .store
                return x
            }
        case .clwb:
            let la = regs.gpr[a] &+ UInt64(bitPattern: imm)
            switch translate(la, .read) {
            case .ok(let h):
                if h >= deviceBase, let spa = vm.pmemSPA(h) { vm.platform.writeBack(cpu: id, spa: spa) }
            case .fault(let v, let err): return fault(v, err, la)
            case .exit(let x): return x
            }
        case .sfence:
            vm.platform.fence(cpu: id)
        case .jmp: next = next &+ UInt64(bitPattern: imm)
        case .jmpr: next = regs.gpr[a]
        case .jz: if regs.gpr[a] == 0 { next = next &+ UInt64(bitPattern: imm) }
        case .jnz: if regs.gpr[a] != 0 { next = next &+ UInt64(bitPattern: imm) }
        case .syscall:
            regs.gpr[1] = next
            let prev = regs.cpl
            regs.cpl = 0
            next = regs.lstar
            if prev == 3 && controls.contains(.escalation) { exit = VMExit(reason: .escalation) }
        case .sysret, .iret:
            guard regs.cpl == 0 else { return fault(Vector.generalProtection, 0, rip) }
            next = op == .sysret ? regs.gpr[1] : regs.gpr[a]
            regs.cpl = 3
            if controls.contains(.returnToUser) { exit = VMExit(reason: .returnToUser) }
        case .hlt:
            guard regs.cpl == 0 else { return fault(Vector.generalProtection, 0, rip) }
            exit = VMExit(reason: .halt)
        case .out:
            var x = VMExit(reason: .io)
            x.ioPort = UInt32(truncatingIfNeeded: imm); x.ioValue = regs.gpr[a]
            exit = x
        case .movcr3:
            guard regs.cpl == 0 else { return fault(Vector.generalProtection, 0, rip) }
            regs.cr3 = regs.gpr[a]
            tlb.flushAll()
        case .rsm:
            // The core decides whether this vCPU is in the mode (and restores its state) or not (#UD).
            return VMExit(reason: .leaveMode)
        }
        let holder = vm.visibleHolder.load(ordering: .relaxed)
        if holder >= 0 && holder != Int64(index) { vm.outsideCounter.wrappingAdd(1, ordering: .relaxed) }
        regs.rip = next
        retired += 1
        slice += 1
        publishCounters()
        return exit
    }
}
