/// A reference model of true hardware MBEC, written independently of the emulation: it runs the
/// simulator's guest ISA (docs/guest-isa.md) over guest paging and the *policy itself*, with no shadow
/// hierarchy, no TLB and no exits. A fetch may execute iff the policy's bit 2 (supervisor-mode linear
/// address) or bit 10 (user-mode linear address: U/S = 1 at every level of the guest walk) is set
/// (Intel SDM 29.3.3.2). It is the oracle of the differential tests.
public struct ReferenceMachine: Sendable {
    public var regs: Registers
    public var memory: GuestImage
    public let ramSize: UInt64
    /// The policy of each guest-physical page.
    public var policy: @Sendable (UInt64) -> EPTPermissions

    public enum Outcome: Equatable, Sendable {
        /// One instruction retired, or one fault delivered to the guest's handler.
        case stepped
        case io(port: UInt32, value: UInt64)
        case halt
        /// What the VMM sees: an EPT violation with the MBEC qualification.
        case violation(gpa: UInt64, gva: UInt64, qualification: UInt64)
        case guestFault(vector: UInt32, error: UInt64, address: UInt64)
    }

    public init(regs: Registers, memory: GuestImage, ramSize: UInt64, policy: @escaping @Sendable (UInt64) -> EPTPermissions) {
        self.regs = regs; self.memory = memory; self.ramSize = ramSize; self.policy = policy
    }

    private enum Kind { case fetch, read, write }
    private enum Walk { case ok(UInt64), fault(UInt32, UInt64), violation(Outcome) }

    private func eptAllows(_ gpa: UInt64, _ k: Kind, userLinear: Bool) -> Bool {
        guard gpa < ramSize else { return false }
        let p = policy(gpa)
        switch k {
        case .read: return p.contains(.read)
        case .write: return p.contains(.write)
        case .fetch: return p.contains(userLinear ? .userExecute : .supervisorExecute)
        }
    }

    private func violation(_ gpa: UInt64, _ la: UInt64, _ k: Kind, translation: Bool, user: Bool) -> Outcome {
        var access: ViolationQualification
        switch k { case .fetch: access = .fetch; case .read: access = .read; case .write: access = .write }
        var linear: ViolationQualification = [.linearValid]
        if translation { linear.insert(.linearTranslation); if user { linear.insert(.userLinear) } }
        let p = gpa < ramSize ? policy(gpa) : .none
        return .violation(gpa: gpa, gva: la, qualification: ViolationQualification.mbec(access: access, policy: p, linear: linear).rawValue)
    }

    private func pf(_ k: Kind, present: Bool) -> (UInt32, UInt64) {
        var e: UInt64 = present ? 1 : 0
        if k == .write { e |= 2 }
        if regs.cpl == 3 { e |= 4 }
        if k == .fetch { e |= 16 }
        return (14, e)
    }

    private func access(_ la: UInt64, _ k: Kind) -> Walk {
        var gpa = la
        var user = false, writable = true, nx = false
        let paging = regs.cr0 & Registers.cr0PG != 0
        if paging {
            let top = la >> 47
            if top != 0 && top != 0x1FFFF { return .fault(13, 0) }
            user = true
            var table = regs.cr3 & 0x000F_FFFF_FFFF_F000
            for level in stride(from: 4, through: 1, by: -1) {
                let shift = UInt64(12 + 9 * (level - 1))
                let ea = table + ((la >> shift) & 511) * 8
                if !eptAllows(ea, .read, userLinear: false) {
                    return .violation(violation(ea, la, .read, translation: false, user: false))
                }
                let e = memory.read64(ea)
                if e & 1 == 0 { let f = pf(k, present: false); return .fault(f.0, f.1) }
                user = user && e & 4 != 0
                writable = writable && e & 2 != 0
                if regs.efer & Registers.eferNXE != 0 && e >> 63 == 1 { nx = true }
                if level == 1 || (level <= 3 && e & 0x80 != 0) {
                    let m = (UInt64(1) << shift) - 1
                    gpa = (e & 0x000F_FFFF_FFFF_F000 & ~m) | (la & m)
                    break
                }
                table = e & 0x000F_FFFF_FFFF_F000
            }
            let cpl3 = regs.cpl == 3
            let protection: Bool
            switch k {
            case .fetch:
                protection = (cpl3 && !user) || nx || (!cpl3 && user && regs.cr4 & Registers.cr4SMEP != 0)
            case .read:
                protection = (cpl3 && !user) || (!cpl3 && user && regs.cr4 & Registers.cr4SMAP != 0)
            case .write:
                protection = (cpl3 && !user) || (!cpl3 && user && regs.cr4 & Registers.cr4SMAP != 0) || !writable
            }
            if protection { let f = pf(k, present: true); return .fault(f.0, f.1) }
        }
        if !eptAllows(gpa, k, userLinear: user) {
            return .violation(violation(gpa, la, k, translation: true, user: user))
        }
        return .ok(gpa)
    }

    private mutating func fault(_ vector: UInt32, _ error: UInt64, _ address: UInt64) -> Outcome {
        if regs.faultHandler == 0 { return .guestFault(vector: vector, error: error, address: address) }
        regs.gpr[12] = UInt64(regs.cpl)
        regs.gpr[13] = UInt64(vector)
        regs.gpr[14] = error
        regs.gpr[15] = regs.rip
        regs.cr2 = address
        regs.cpl = 0
        regs.rip = regs.faultHandler
        return .stepped
    }

    /// Executes one instruction (or delivers one fault).
    public mutating func step() -> Outcome {
        let rip = regs.rip
        if rip % 8 != 0 { return fault(13, 0, rip) }
        let word: UInt64
        switch access(rip, .fetch) {
        case .ok(let g): word = memory.read64(g)
        case .fault(let v, let e): return fault(v, e, rip)
        case .violation(let o): return o
        }
        let op = word & 0xFF, a = Int((word >> 8) & 0xFF), b = Int((word >> 16) & 0xFF)
        let imm = UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: word >> 32)))
        guard op <= 0x15, a < 16, b < 16 else { return fault(6, 0, rip) }
        var next = rip &+ 8
        var outcome = Outcome.stepped
        switch op {
        case 0x00: break
        case 0x01: regs.gpr[a] = imm
        case 0x02: regs.gpr[a] = (regs.gpr[a] & 0xFFFF_FFFF) | (imm << 32)
        case 0x03: regs.gpr[a] = regs.gpr[b]
        case 0x04: regs.gpr[a] &+= regs.gpr[b]
        case 0x05: regs.gpr[a] &+= imm
        case 0x12: regs.gpr[a] &-= regs.gpr[b]
        case 0x06, 0x07:
            let la = (op == 0x06 ? regs.gpr[b] : regs.gpr[a]) &+ imm
            if la % 8 != 0 { return fault(13, 0, la) }
            switch access(la, op == 0x06 ? .read : .write) {
            case .ok(let g): if op == 0x06 { regs.gpr[a] = memory.read64(g) } else { memory.write64(g, regs.gpr[b]) }
            case .fault(let v, let e): return fault(v, e, la)
            case .violation(let o): return o
            }
        case 0x08: next &+= imm
        case 0x09: next = regs.gpr[a]
        case 0x0A: if regs.gpr[a] == 0 { next &+= imm }
        case 0x0B: if regs.gpr[a] != 0 { next &+= imm }
        case 0x0C: regs.gpr[1] = next; regs.cpl = 0; next = regs.lstar
        case 0x0D, 0x11:
            if regs.cpl != 0 { return fault(13, 0, rip) }
            next = op == 0x0D ? regs.gpr[1] : regs.gpr[a]
            regs.cpl = 3
        case 0x0E:
            if regs.cpl != 0 { return fault(13, 0, rip) }
            outcome = .halt
        case 0x0F: outcome = .io(port: UInt32(truncatingIfNeeded: imm), value: regs.gpr[a])
        case 0x10:
            if regs.cpl != 0 { return fault(13, 0, rip) }
            regs.cr3 = regs.gpr[a]
        case 0x14:
            // CLWB: the permission checks of a byte load; no effect on what the model computes.
            let la = regs.gpr[a] &+ imm
            switch access(la, .read) {
            case .ok: break
            case .fault(let v, let e): return fault(v, e, la)
            case .violation(let o): return o
            }
        case 0x15: break   // SFENCE
        default: return fault(6, 0, rip)
        }
        regs.rip = next
        return outcome
    }
}
