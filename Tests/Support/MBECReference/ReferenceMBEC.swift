/// A reference model of a processor with hardware mode-based execute control (MBEC), written from the
/// Intel SDM's rules and the guest ISA's specification (docs/guest-isa.md), for differential tests of
/// NPTKit's emulation.
///
/// It is independent of the emulation on purpose: this target imports nothing of NPTKit (no shared
/// permission types, qualification helpers, page-walk or ISA code). It runs the guest ISA directly
/// over x86-64 4-level guest paging and the EPT policy itself (one EPT with MBEC: no shadow
/// hierarchy, no TLB, no exits other than the ones hardware would take).
///
/// Rules implemented, with their source:
/// - Linear-address translation (SDM Vol. 3A 4.5): 4-level paging, 4 KiB pages, 2 MiB pages (PS in a
///   PDE) and 1 GiB pages (PS in a PDPTE); non-canonical addresses take #GP(0) (3.3.7.1).
/// - Reserved bits (4.5, Tables 4-15 to 4-20) with MAXPHYADDR = 52: PS in a PML4E; bits 29:13 of a
///   PDPTE that maps 1 GiB; bits 20:13 of a PDE that maps 2 MiB; XD (bit 63) at any level while
///   IA32_EFER.NXE = 0. A reserved bit gives #PF with P = 1 and RSVD = 1 (4.7).
/// - Access rights (4.6.1): a linear address is a user-mode address iff U/S = 1 in every
///   paging-structure entry used to translate it; it is writable iff R/W = 1 in every entry; it is
///   execute-disable iff NXE = 1 and XD = 1 in some entry.
///   * CPL 3 (user-mode accesses): only user-mode addresses; writes need the address writable;
///     fetches need it not execute-disable.
///   * CPL 0 data reads of user-mode addresses: not allowed if CR4.SMAP = 1 and RFLAGS.AC = 0.
///   * CPL 0 data writes: to a supervisor-mode address, allowed if CR0.WP = 0, else only if writable;
///     to a user-mode address, not allowed if CR4.SMAP = 1 and RFLAGS.AC = 0, otherwise as for a
///     supervisor-mode address (CR0.WP decides).
///   * CPL 0 fetches: from a user-mode address not allowed if CR4.SMEP = 1; never from an
///     execute-disable address.
/// - Page-fault error code (4.7): P (0) = 0 for a not-present entry, 1 otherwise; W/R (1) = the
///   access was a write; U/S (2) = CPL 3; RSVD (3) = a reserved bit; I/D (4) = the access was a fetch
///   and (CR4.SMEP = 1 or IA32_EFER.NXE = 1).
/// - Accessed and dirty flags (4.8): A is set in every paging-structure entry used to translate the
///   address, D in the entry that maps the page on a write, each only if not already set. The SDM
///   leaves open whether they are set for an access that faults; this model (and the emulation, by
///   the same convention) sets them only once the access passes the guest paging checks, entries
///   from the top level down, A and D of the leaf in one update.
/// - EPT (SDM Vol. 3C 29.3.3): reads of paging-structure entries need EPT read permission of their
///   guest-physical address (a data read, 29.3.3.2); the processor's A/D updates are writes and need
///   write permission. With MBEC (29.3.3.2), a fetch from a supervisor-mode linear address needs
///   bit 2 of the EPT entry, from a user-mode linear address bit 10. With CR0.PG = 0 every linear
///   address is a user-mode address (and writable, and executable: Table 28-7's notes), and the
///   linear address is the guest-physical address.
/// - Exit qualification of an EPT violation (Vol. 3C Table 28-7): bit 0 read, 1 write, 2 fetch (the
///   access); bits 3, 4, 5, 6: the EPT entry's bit 0, 1, 2 (supervisor execute) and 10 (user
///   execute); bit 7 = 1 (the linear-address field is valid: every access here has one); bit 8 = 1
///   for the access to the translation of the linear address, 0 for an access to a paging-structure
///   entry (a walk's read, an A/D update); bits 9, 10, 11 only when bit 8 = 1 (advanced VM-exit
///   information): the address is user-mode (9), writable (10), execute-disable (11).
/// - A guest-physical address at or above 2^48 is outside 4-level EPT: not present (bits 3-6 = 0).
package struct ReferenceCPU: Equatable, Sendable {
    package var cpl: UInt32 = 0
    package var rip: UInt64 = 0
    package var rflags: UInt64 = 2
    package var gpr = [UInt64](repeating: 0, count: 16)
    package var cr0: UInt64 = 0
    package var cr2: UInt64 = 0
    package var cr3: UInt64 = 0
    package var cr4: UInt64 = 0
    package var efer: UInt64 = 0
    package var lstar: UInt64 = 0
    package var faultHandler: UInt64 = 0
    package init() {}
}

/// Sparse guest-physical memory, 8-byte words (every access of the ISA and every paging-structure
/// entry is 8-byte aligned).
package struct ReferenceMemory: Sendable {
    private var pages: [UInt64: [UInt64]] = [:]
    package init() {}
    package func read(_ gpa: UInt64) -> UInt64 {
        guard let p = pages[gpa >> 12] else { return 0 }
        return p[Int((gpa & 0xFFF) >> 3)]
    }
    package mutating func write(_ gpa: UInt64, _ v: UInt64) {
        let f = gpa >> 12
        if pages[f] == nil { pages[f] = [UInt64](repeating: 0, count: 512) }
        pages[f]![Int((gpa & 0xFFF) >> 3)] = v
    }
    /// Loads bytes (little-endian words; a trailing partial word is zero-padded).
    package mutating func load(_ gpa: UInt64, bytes: [UInt8]) {
        var i = 0
        while i < bytes.count {
            var w: UInt64 = 0
            for k in 0..<8 where i + k < bytes.count { w |= UInt64(bytes[i + k]) << (8 * UInt64(k)) }
            write(gpa + UInt64(i), w)
            i += 8
        }
    }
    package var frames: [UInt64] { pages.keys.sorted() }
}

package enum ReferenceOutcome: Equatable, Sendable {
    /// One instruction retired, or one fault delivered to the guest's handler.
    case stepped
    case io(port: UInt32, value: UInt64)
    case halt
    /// An EPT violation: what the VMM sees (nothing retired).
    case violation(gpa: UInt64, gla: UInt64, qualification: UInt64)
    /// A fault with no guest handler (nothing retired).
    case guestFault(vector: UInt32, error: UInt64, address: UInt64)
    /// RSM (opcode 0x13): whether it leaves the privileged mode or is #UD is the VMM's business.
    case rsm
}

package struct ReferenceMBEC: Sendable {
    package var cpu: ReferenceCPU
    package var memory: ReferenceMemory
    /// The EPT policy of a guest-physical page: bits 0 (R), 1 (W), 2 (supervisor X), 10 (user X);
    /// 0 = not present.
    package var policy: @Sendable (UInt64) -> UInt64
    /// Guest-physical addresses written by the last `step` (stores and A/D updates), in order.
    package private(set) var writes: [UInt64] = []
    /// Where the last step's STORE wrote (nil: it stored nothing).
    package private(set) var storedTo: UInt64?

    package init(cpu: ReferenceCPU, memory: ReferenceMemory, policy: @escaping @Sendable (UInt64) -> UInt64) {
        self.cpu = cpu; self.memory = memory; self.policy = policy
    }

    // Architectural bit positions (SDM), defined here and nowhere shared.
    private static let cr0PG: UInt64 = 1 << 31, cr0WP: UInt64 = 1 << 16
    private static let cr4SMEP: UInt64 = 1 << 20, cr4SMAP: UInt64 = 1 << 21
    private static let eferNXE: UInt64 = 1 << 11, rflagsAC: UInt64 = 1 << 18
    private static let pteP: UInt64 = 1, pteRW: UInt64 = 2, pteUS: UInt64 = 4, pteA: UInt64 = 1 << 5, pteD: UInt64 = 1 << 6
    private static let ptePS: UInt64 = 1 << 7, pteXD: UInt64 = 1 << 63
    private static let address: UInt64 = 0x000F_FFFF_FFFF_F000  // bits 51:12 (MAXPHYADDR 52)
    private static let eptR: UInt64 = 1, eptW: UInt64 = 2, eptXs: UInt64 = 4, eptXu: UInt64 = 1 << 10

    private enum Access { case fetch, read, write }
    private enum Fault: Error { case pageFault(UInt64), generalProtection, ept(gpa: UInt64, qualification: UInt64) }

    private var nxe: Bool { cpu.efer & ReferenceMBEC.eferNXE != 0 }

    /// Bits 3-6 of the qualification from the EPT entry of `gpa`.
    private func eptBits(_ gpa: UInt64) -> UInt64 {
        let p = gpa >= 1 << 48 ? 0 : policy(gpa)
        return ((p & 7) << 3) | ((p >> 10 & 1) << 6)
    }

    private func eptPermits(_ gpa: UInt64, _ need: UInt64) -> Bool {
        gpa < 1 << 48 && policy(gpa) & need == need
    }

    /// An EPT violation on a paging-structure access (bit 8 clear; bits 9-11 undefined: 0).
    private func structureViolation(_ gpa: UInt64, write: Bool) -> Fault {
        .ept(gpa: gpa, qualification: (write ? 2 : 1) | eptBits(gpa) | 1 << 7)
    }

    private func pfCode(_ a: Access, present: Bool, reserved: Bool = false) -> UInt64 {
        var e: UInt64 = present ? 1 : 0
        if a == .write { e |= 2 }
        if cpu.cpl == 3 { e |= 4 }
        if reserved { e |= 8 }
        if a == .fetch && (cpu.cr4 & ReferenceMBEC.cr4SMEP != 0 || nxe) { e |= 16 }
        return e
    }

    private func reservedBitsSet(_ e: UInt64, level: Int) -> Bool {
        if !nxe && e & ReferenceMBEC.pteXD != 0 { return true }
        switch level {
        case 4: return e & ReferenceMBEC.ptePS != 0
        case 3: return e & ReferenceMBEC.ptePS != 0 && e & 0x3FFF_E000 != 0     // bits 29:13
        case 2: return e & ReferenceMBEC.ptePS != 0 && e & 0x1F_E000 != 0       // bits 20:13
        default: return false
        }
    }

    /// Translates `la` for `a` and applies the access rules; returns the guest-physical address.
    private mutating func translate(_ la: UInt64, _ a: Access) throws(Fault) -> UInt64 {
        var gpa = la
        var userAddress = true, writable = true, executeDisable = false
        if cpu.cr0 & ReferenceMBEC.cr0PG != 0 {
            let top = la >> 47
            guard top == 0 || top == 0x1FFFF else { throw .generalProtection }
            var used: [(gpa: UInt64, value: UInt64)] = []
            var table = cpu.cr3 & ReferenceMBEC.address
            var level = 4
            while true {
                let shift = UInt64(12 + 9 * (level - 1))
                let ea = table + ((la >> shift) & 511) * 8
                guard eptPermits(ea, ReferenceMBEC.eptR) else { throw structureViolation(ea, write: false) }
                let e = memory.read(ea)
                guard e & ReferenceMBEC.pteP != 0 else { throw .pageFault(pfCode(a, present: false)) }
                guard !reservedBitsSet(e, level: level) else { throw .pageFault(pfCode(a, present: true, reserved: true)) }
                used.append((ea, e))
                userAddress = userAddress && e & ReferenceMBEC.pteUS != 0
                writable = writable && e & ReferenceMBEC.pteRW != 0
                executeDisable = executeDisable || (nxe && e & ReferenceMBEC.pteXD != 0)
                if level == 1 || e & ReferenceMBEC.ptePS != 0 {
                    let offset = (UInt64(1) << shift) - 1
                    gpa = (e & ReferenceMBEC.address & ~offset) | (la & offset)
                    break
                }
                table = e & ReferenceMBEC.address
                level -= 1
            }
            // Access rights (4.6.1).
            let smap = cpu.cr4 & ReferenceMBEC.cr4SMAP != 0 && cpu.rflags & ReferenceMBEC.rflagsAC == 0
            let wp = cpu.cr0 & ReferenceMBEC.cr0WP != 0
            let allowed: Bool
            if cpu.cpl == 3 {
                switch a {
                case .read: allowed = userAddress
                case .write: allowed = userAddress && writable
                case .fetch: allowed = userAddress && !executeDisable
                }
            } else {
                switch a {
                case .read: allowed = !(userAddress && smap)
                case .write: allowed = !(userAddress && smap) && (!wp || writable)
                case .fetch: allowed = !(userAddress && cpu.cr4 & ReferenceMBEC.cr4SMEP != 0) && !executeDisable
                }
            }
            guard allowed else { throw .pageFault(pfCode(a, present: true)) }
            // Accessed and dirty flags (4.8): writes to the paging structures, checked by EPT.
            for (k, u) in used.enumerated() {
                var want = u.value | ReferenceMBEC.pteA
                if k == used.count - 1 && a == .write { want |= ReferenceMBEC.pteD }
                if want == u.value { continue }
                guard eptPermits(u.gpa, ReferenceMBEC.eptW) else { throw structureViolation(u.gpa, write: true) }
                memory.write(u.gpa, want)
                writes.append(u.gpa)
            }
        }
        // EPT on the translation itself, with MBEC for fetches.
        let need: UInt64
        switch a {
        case .read: need = ReferenceMBEC.eptR
        case .write: need = ReferenceMBEC.eptW
        case .fetch: need = userAddress ? ReferenceMBEC.eptXu : ReferenceMBEC.eptXs
        }
        guard eptPermits(gpa, need) else {
            var q: UInt64 = a == .read ? 1 : a == .write ? 2 : 4
            q |= eptBits(gpa) | 1 << 7 | 1 << 8
            if userAddress { q |= 1 << 9 }
            if writable { q |= 1 << 10 }
            if executeDisable { q |= 1 << 11 }
            throw .ept(gpa: gpa, qualification: q)
        }
        return gpa
    }

    /// Delivers a fault or interrupt to the guest's handler (docs/guest-isa.md, "Faults").
    private mutating func deliver(_ vector: UInt32, _ error: UInt64, _ address: UInt64) -> ReferenceOutcome {
        guard cpu.faultHandler != 0 else { return .guestFault(vector: vector, error: error, address: address) }
        cpu.gpr[12] = UInt64(cpu.cpl)
        cpu.gpr[13] = UInt64(vector)
        cpu.gpr[14] = error
        cpu.gpr[15] = cpu.rip
        cpu.cr2 = address
        cpu.cpl = 0
        cpu.rip = cpu.faultHandler
        return .stepped
    }

    /// The VMM injects an exception or interrupt (delivered at once, as the next step would).
    package mutating func inject(vector: UInt32, error: UInt64, address: UInt64) -> ReferenceOutcome {
        writes = []
        storedTo = nil
        return deliver(vector, error, address)
    }

    private mutating func failed(_ f: Fault, _ la: UInt64) -> ReferenceOutcome {
        switch f {
        case .pageFault(let e): return deliver(14, e, la)
        case .generalProtection: return deliver(13, 0, la)
        case .ept(let g, let q): return .violation(gpa: g, gla: la, qualification: q)
        }
    }

    /// Executes one instruction, or delivers one fault.
    package mutating func step() -> ReferenceOutcome {
        writes = []
        storedTo = nil
        let rip = cpu.rip
        guard rip % 8 == 0 else { return deliver(13, 0, rip) }
        let word: UInt64
        do throws(Fault) { word = memory.read(try translate(rip, .fetch)) } catch { return failed(error, rip) }
        let op = word & 0xFF, a = Int(word >> 8 & 0xFF), b = Int(word >> 16 & 0xFF)
        let imm = UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: word >> 32)))
        guard a < 16, b < 16 else { return deliver(6, 0, rip) }
        var next = rip &+ 8
        var outcome = ReferenceOutcome.stepped
        switch op {
        case 0x00, 0x15: break                                      // NOP, SFENCE
        case 0x01: cpu.gpr[a] = imm                                 // MOVI
        case 0x02: cpu.gpr[a] = cpu.gpr[a] & 0xFFFF_FFFF | imm << 32 // MOVHI
        case 0x03: cpu.gpr[a] = cpu.gpr[b]                          // MOV
        case 0x04: cpu.gpr[a] = cpu.gpr[a] &+ cpu.gpr[b]            // ADD
        case 0x05: cpu.gpr[a] = cpu.gpr[a] &+ imm                   // ADDI
        case 0x12: cpu.gpr[a] = cpu.gpr[a] &- cpu.gpr[b]            // SUB
        case 0x06, 0x07:                                            // LOAD, STORE
            let la = (op == 0x06 ? cpu.gpr[b] : cpu.gpr[a]) &+ imm
            guard la % 8 == 0 else { return deliver(13, 0, la) }
            do throws(Fault) {
                let g = try translate(la, op == 0x06 ? .read : .write)
                if op == 0x06 { cpu.gpr[a] = memory.read(g) } else { memory.write(g, cpu.gpr[b]); writes.append(g); storedTo = g }
            } catch { return failed(error, la) }
        case 0x14:                                                  // CLWB: the checks of a load
            let la = cpu.gpr[a] &+ imm
            do throws(Fault) { _ = try translate(la, .read) } catch { return failed(error, la) }
        case 0x08: next = next &+ imm                               // JMP
        case 0x09: next = cpu.gpr[a]                                // JMPR
        case 0x0A: if cpu.gpr[a] == 0 { next = next &+ imm }        // JZ
        case 0x0B: if cpu.gpr[a] != 0 { next = next &+ imm }        // JNZ
        case 0x0C: cpu.gpr[1] = next; cpu.cpl = 0; next = cpu.lstar // SYSCALL
        case 0x0D, 0x11:                                            // SYSRET, IRET
            guard cpu.cpl == 0 else { return deliver(13, 0, rip) }
            next = op == 0x0D ? cpu.gpr[1] : cpu.gpr[a]
            cpu.cpl = 3
        case 0x0E:                                                  // HLT
            guard cpu.cpl == 0 else { return deliver(13, 0, rip) }
            outcome = .halt
        case 0x0F: outcome = .io(port: UInt32(truncatingIfNeeded: imm), value: cpu.gpr[a])   // OUT
        case 0x10:                                                  // MOVCR3
            guard cpu.cpl == 0 else { return deliver(13, 0, rip) }
            cpu.cr3 = cpu.gpr[a]
        case 0x13: return .rsm
        default: return deliver(6, 0, rip)
        }
        cpu.rip = next
        return outcome
    }
}
