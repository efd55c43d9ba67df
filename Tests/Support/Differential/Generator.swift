import MBECReference
import NPTCore
import NPTSimulator
import Synchronization

/// The guest-physical layout of an episode.
enum Layout {
    static let ram: UInt64 = 8 << 20
    static let tableFrames: Range<UInt64> = 0..<0x40            // page tables live here
    static let firstFrame: UInt64 = 0x40                          // code and data from here
    static let ramFrames = ram >> 12
    static let mixedBlock: UInt64 = 4 << 20                       // a 2 MiB block with mixed policy
    static let region: UInt64 = 0x100_0000                        // privileged-mode region (outside RAM)
    static let regionPages: UInt64 = 4
    static let regionEntry: UInt64 = 0x2000
    static let nvdimm: UInt64 = 0x4000_0000                       // an NVDIMM range
    static let nvdimmPages: UInt64 = 16

    // Linear layout.
    static let userBase: UInt64 = 0x40_0000
    static let kernelBase: UInt64 = 0xFFFF_8000_0000_0000
    static let tableAlias: UInt64 = 0x50_0000                     // page-table frames, mapped as data
    static let nvdimmAlias: UInt64 = 0x60_0000
    static let gigaUser: UInt64 = 0x80_0000_0000                  // a 1 GiB guest page over GPA 0
    static let gigaKernel: UInt64 = kernelBase + 0x80_0000_0000
    static let pages = 40
}

/// A page-table builder writing straight into the reference memory (the ground truth both machines
/// start from), with random flags at every level.
struct TableBuilder {
    let cr3: UInt64
    private var next: UInt64
    private let limit: UInt64
    private(set) var tables: [UInt64]
    init(first: UInt64, limit: UInt64) { cr3 = first; next = first + 0x1000; self.limit = limit; tables = [first] }

    /// Maps `gva` to `gpa` with a leaf at `level` (1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB) and `leafFlags`.
    /// Intermediate entries created here get random flags (present, mostly writable, U/S as `user`,
    /// sometimes XD, accessed set or not).
    mutating func map(_ mem: inout ReferenceMemory, gva: UInt64, gpa: UInt64, level: Int, leafFlags: UInt64,
                      user: Bool, rng: inout Rand) {
        var table = cr3
        var l = 4
        while l > level {
            let ea = table + ((gva >> (12 + 9 * UInt64(l - 1))) & 511) * 8
            var e = mem.read(ea)
            if e & 1 == 0 || e & 0x80 != 0 {
                guard next < limit else { return }
                let t = next
                next += 0x1000
                tables.append(t)
                e = t | 1
                if rng.chance(92) { e |= 2 }
                if user || rng.chance(10) { e |= 4 }
                if rng.chance(4) { e |= 1 << 63 }
                if rng.chance(50) { e |= 1 << 5 }
                if l == 4 && rng.chance(1) { e |= 0x80 }          // reserved: PS in a PML4E
                mem.write(ea, e)
            }
            table = e & 0x000F_FFFF_FFFF_F000
            l -= 1
        }
        let ea = table + ((gva >> (12 + 9 * UInt64(level - 1))) & 511) * 8
        mem.write(ea, gpa | leafFlags | (level > 1 ? 0x80 : 0))
    }
}

/// The policy both machines see, versioned for the threaded runs.
final class PolicyBox: @unchecked Sendable {
    private let lock = Mutex<[UInt64: UInt64]>([:])
    private let ramPolicy: Mutex<[UInt64]>
    init(ram: [UInt64]) { ramPolicy = Mutex(ram) }
    func get(_ gpa: UInt64) -> UInt64 {
        let f = gpa >> 12
        if f < Layout.ramFrames { return ramPolicy.withLock { $0[Int(f)] } }
        return lock.withLock { $0[f] ?? 0 }
    }
    func set(frame f: UInt64, _ p: UInt64) {
        if f < Layout.ramFrames { ramPolicy.withLock { $0[Int(f)] = p } } else { lock.withLock { $0[f] = p } }
    }
    /// An immutable copy (for the reference of a threaded run).
    func snapshot() -> @Sendable (UInt64) -> UInt64 {
        let ram = ramPolicy.withLock { $0 }
        let other = lock.withLock { $0 }
        return { g in let f = g >> 12; return f < Layout.ramFrames ? ram[Int(f)] : (other[f] ?? 0) }
    }
}

enum PolicyChoice {
    static let weights: [(EPTPermissions, UInt64)] = [
        ([.read, .write], 30), ([.read, .supervisorExecute], 14), ([.read, .userExecute], 14),
        ([.read, .supervisorExecute, .userExecute], 10), ([.read], 8), ([], 4),
        ([.supervisorExecute], 4), ([.userExecute], 4), ([.read, .write, .supervisorExecute], 4),
        ([.read, .write, .userExecute], 4), (.all, 4),
    ]
    static func pick(_ rng: inout Rand) -> EPTPermissions {
        var n = rng.below(100)
        for (p, w) in weights { if n < w { return p }; n -= w }
        return .all
    }
}

/// One random guest: memory (with its page tables), policy, code, the addresses a program uses.
struct Guest: Sendable {
    var memory = ReferenceMemory()
    var ramPolicy: [UInt64]
    var otherPolicy: [UInt64: UInt64] = [:]
    var cr3: UInt64 = 0
    var tables: [UInt64] = []
    var codeAddresses: [UInt64] = []          // linear, paging on
    var dataAddresses: [UInt64] = []
    var physicalCode: [UInt64] = []           // guest-physical, paging off
    var physicalData: [UInt64] = []
    var regionCode: [UInt64] = []
    /// Frames whose contents are compared and resynchronized.
    var watched: Set<UInt64> = []
    /// The threaded runs: the guest must stay in its own frames (each vCPU's reference model sees
    /// only its own memory), so no 1 GiB pages (they reach every frame), no writes to its own page
    /// tables and no MOV to CR3 (either can point a translation anywhere), no random instruction
    /// that writes an address register, and the last frame of its range stays unused (code running
    /// off a page with paging off would enter the next vCPU's frame).
    var confined = false

    /// `frames`: the RAM frames this guest may use for code and data (disjoint per vCPU in the
    /// threaded runs); `tableBase`: where its page tables go.
    init(rng: inout Rand, frames: Range<UInt64>, tableBase: UInt64, tableLimit: UInt64 = Layout.tableFrames.upperBound << 12,
         nvdimm: Bool, region: Bool, confined: Bool = false) {
        self.confined = confined
        let gigaPages = !confined
        ramPolicy = [UInt64](repeating: EPTPermissions([.read, .write]).rawValue, count: Int(Layout.ramFrames))
        for f in frames { ramPolicy[Int(f)] = PolicyChoice.pick(&rng).rawValue }
        var pt = TableBuilder(first: tableBase, limit: tableLimit)
        let ownsMixed = frames.contains(Layout.mixedBlock >> 12) && frames.contains((Layout.mixedBlock >> 12) + 511)
        var used: [UInt64] = []
        func frame(_ rng: inout Rand) -> UInt64 {
            if !used.isEmpty && rng.chance(30) { return rng.pick(used) }
            let mixed = Layout.mixedBlock >> 12
            if ownsMixed && rng.chance(25) { return mixed + rng.below(512) }
            return frames.lowerBound + rng.below(UInt64(frames.count - (confined ? 1 : 0)))
        }
        // A 2 MiB block with one policy, then a few pages changed (when this guest owns it).
        let mixed = Layout.mixedBlock >> 12
        if ownsMixed {
            let u = PolicyChoice.pick(&rng).rawValue
            for f in mixed..<(mixed + 512) { ramPolicy[Int(f)] = u }
            for _ in 0..<24 { ramPolicy[Int(mixed + rng.below(512))] = PolicyChoice.pick(&rng).rawValue }
        }
        for region in 0..<2 {
            let base = region == 0 ? Layout.userBase : Layout.kernelBase
            for i in 0..<Layout.pages {
                let gva = base + UInt64(i) * 0x1000
                let f = frame(&rng)
                if !used.contains(f) { used.append(f) }
                // The gap case on purpose: a supervisor-execute-only page at a user-mode address.
                if region == 0 && rng.chance(30) {
                    ramPolicy[Int(f)] = rng.chance(50) ? EPTPermissions([.read, .supervisorExecute]).rawValue
                                                       : EPTPermissions.supervisorExecute.rawValue
                }
                var flags: UInt64 = rng.chance(94) ? 1 : 0
                let user = region == 0 ? rng.chance(90) : rng.chance(10)
                if user { flags |= 4 }
                if rng.chance(50) { flags |= 2 }
                if rng.chance(12) { flags |= 1 << 63 }
                if rng.chance(50) { flags |= 1 << 5 }
                if rng.chance(40) { flags |= 1 << 6 }
                pt.map(&memory, gva: gva, gpa: f << 12, level: 1, leafFlags: flags, user: user, rng: &rng)
                codeAddresses.append(gva)
                dataAddresses.append(gva)
            }
        }
        // 2 MiB guest pages over the mixed block, at a user and at a supervisor address.
        if ownsMixed {
            pt.map(&memory, gva: 0x4000_0000, gpa: Layout.mixedBlock, level: 2, leafFlags: 0x7 | (rng.chance(50) ? 1 << 5 : 0),
                   user: true, rng: &rng)
            pt.map(&memory, gva: Layout.kernelBase + 0x4000_0000, gpa: Layout.mixedBlock, level: 2, leafFlags: 0x3, user: false, rng: &rng)
            for _ in 0..<8 {
                let off = rng.below(512) << 12
                codeAddresses.append(0x4000_0000 + off)
                codeAddresses.append(Layout.kernelBase + 0x4000_0000 + off)
            }
        }
        // 1 GiB guest pages over GPA 0 (most of it is beyond RAM: not present in EPT). Not in the
        // threaded runs: such a page reaches every vCPU's frames.
        if gigaPages {
        pt.map(&memory, gva: Layout.gigaUser, gpa: 0, level: 3, leafFlags: 0x7 | (rng.chance(50) ? 1 << 6 : 0), user: true, rng: &rng)
        pt.map(&memory, gva: Layout.gigaKernel, gpa: 0, level: 3, leafFlags: 0x3, user: false, rng: &rng)
        for _ in 0..<6 {
            let f = rng.pick(used)
            codeAddresses.append(Layout.gigaUser + (f << 12))
            codeAddresses.append(Layout.gigaKernel + (f << 12))
            dataAddresses.append(Layout.gigaKernel + (f << 12))
        }
        }
        // The page tables themselves, mapped as data (the guest writes its own tables).
        for (k, t) in pt.tables.prefix(confined ? 0 : 12).enumerated() {
            let user = rng.chance(50)
            pt.map(&memory, gva: Layout.tableAlias + UInt64(k) * 0x1000, gpa: t, level: 1,
                   leafFlags: 0x3 | (user ? 4 : 0), user: user, rng: &rng)
            dataAddresses.append(Layout.tableAlias + UInt64(k) * 0x1000)
        }
        // NVDIMM pages, with their own policies.
        if nvdimm {
            for k in 0..<Layout.nvdimmPages {
                let g = Layout.nvdimm + k * 0x1000
                otherPolicy[g >> 12] = PolicyChoice.pick(&rng).rawValue
                if k < 8 {
                    let user = rng.chance(60)
                    pt.map(&memory, gva: Layout.nvdimmAlias + k * 0x1000, gpa: g, level: 1, leafFlags: 0x3 | (user ? 4 : 0),
                           user: user, rng: &rng)
                    dataAddresses.append(Layout.nvdimmAlias + k * 0x1000)
                    codeAddresses.append(Layout.nvdimmAlias + k * 0x1000)
                }
                watched.insert(g >> 12)
            }
        }
        tables = pt.tables
        cr3 = pt.cr3
        // Tables on policy-restricted pages: read-only (A/D updates violate), rarely unreadable.
        for t in tables {
            let r = rng.below(100)
            ramPolicy[Int(t >> 12)] = r < 14 ? EPTPermissions.read.rawValue : r < 17 ? 0 : EPTPermissions([.read, .write]).rawValue
            watched.insert(t >> 12)
        }
        for f in used { fillCode(&memory, at: f << 12, rng: &rng); watched.insert(f) }
        if ownsMixed {
            for _ in 0..<8 { let f = mixed + rng.below(512); fillCode(&memory, at: f << 12, rng: &rng); watched.insert(f) }
        }
        physicalCode = used.map { $0 << 12 }
        physicalData = used.map { $0 << 12 } + tables
        if region {
            for k in 0..<Layout.regionPages {
                let g = Layout.region + k * 0x1000
                fillCode(&memory, at: g, rng: &rng, rsm: true)
                regionCode.append(g)
                watched.insert(g >> 12)
            }
        }
    }

    /// Random instructions of the ISA (and a little garbage).
    func fillCode(_ mem: inout ReferenceMemory, at gpa: UInt64, rng: inout Rand, rsm: Bool = false) {
        let scratch: [UInt8] = [0, 10, 11]
        var words: [UInt64] = []
        func emit(_ op: Opcode, _ a: UInt8 = 0, _ b: UInt8 = 0, _ imm: Int32 = 0) {
            words.append(UInt64(op.rawValue) | UInt64(a) << 8 | UInt64(b) << 16 | UInt64(UInt32(bitPattern: imm)) << 32)
        }
        for _ in 0..<512 {
            let s = rng.pick(scratch)
            switch rng.below(100) {
            case 0..<8: emit(.nop)
            case 8..<15: emit(.movi, s, 0, Int32(truncatingIfNeeded: rng.next()))
            case 15..<20: emit(.addi, s, 0, Int32(truncatingIfNeeded: rng.below(64)))
            case 20..<23: emit(rng.chance(50) ? .add : .sub, s, rng.pick(scratch))
            case 23..<27: emit(.mov, s, UInt8(2 + rng.below(8)))
            case 27..<37: emit(.load, s, UInt8(2 + rng.below(4)), Int32(rng.below(512) * 8))
            case 37..<46: emit(.store, UInt8(2 + rng.below(4)), s, Int32(rng.below(512) * 8))
            case 46..<48: emit(.store, UInt8(2 + rng.below(4)), UInt8(12 + rng.below(4)), Int32(rng.below(512) * 8))
            case 48..<55: emit(.jmp, 0, 0, Int32(Int64(rng.below(65)) - 32) * 8)
            case 55..<59: emit(rng.chance(50) ? .jz : .jnz, s, 0, Int32(Int64(rng.below(65)) - 32) * 8)
            case 59..<65: emit(.jmpr, UInt8(6 + rng.below(4)))
            case 65..<72: emit(.syscall)
            case 72..<78: emit(.sysret)
            case 78..<82: emit(.iret, UInt8(6 + rng.below(4)))
            case 82..<86: emit(.out, s, 0, Int32(rng.below(4)))
            case 86..<87: emit(.hlt)
            case 87..<89: emit(.clwb, UInt8(2 + rng.below(4)), 0, Int32(rng.below(4096)))
            case 89..<90: emit(.sfence)
            case 90..<91 where !confined: emit(.movcr3, 1)
            case 91..<93: emit(.load, s, UInt8(2 + rng.below(4)), Int32(rng.below(4096)))   // may be misaligned
            case 93..<95: emit(.rsm)
            case 95..<97 where rsm: emit(.rsm)
            default:
                // Confined: no instruction that takes an address from a scratch register.
                if confined { emit(rng.pick([.nop, .movi, .movhi, .mov, .add, .sub, .addi, .syscall, .sysret, .hlt, .out, .sfence, .rsm]),
                                   s, rng.pick(scratch)) }
                else { emit(Opcode.allCases.randomElement(using: &rng)!, UInt8(rng.below(18)), UInt8(rng.below(18))) }
            }
        }
        for (i, w) in words.enumerated() { mem.write(gpa + UInt64(i * 8), w) }
    }

    /// A random machine state.
    func randomState(_ rng: inout Rand, smep: Bool) -> ReferenceCPU {
        var r = ReferenceCPU()
        let paging = rng.chance(92)
        r.cr0 = (paging ? 1 << 31 : 0) | (rng.chance(80) ? 1 << 16 : 0)
        r.cr3 = cr3
        r.cr4 = (smep ? 1 << 20 : 0) | (rng.chance(30) ? 1 << 21 : 0)
        r.efer = rng.chance(75) ? 1 << 11 : 0
        r.rflags = 2 | (rng.chance(30) ? 1 << 18 : 0)
        r.cpl = rng.chance(50) ? 0 : 3
        let code = paging ? codeAddresses : physicalCode
        let data = paging ? dataAddresses : physicalData
        r.rip = rng.pick(code) + rng.below(512) * 8
        r.lstar = paging ? Layout.kernelBase + rng.below(UInt64(Layout.pages)) * 0x1000 + rng.below(512) * 8 : rng.pick(code) + rng.below(512) * 8
        r.faultHandler = rng.chance(50) ? 0 : (paging ? Layout.kernelBase + rng.below(UInt64(Layout.pages)) * 0x1000 : rng.pick(code))
        for i in 2...5 { r.gpr[i] = rng.pick(data) }
        // More stores into the guest's own page tables and its NVDIMM pages.
        if paging && !confined && rng.chance(40) { r.gpr[5] = Layout.tableAlias + rng.below(UInt64(min(12, tables.count))) * 0x1000 }
        if paging && !confined && rng.chance(30) { r.gpr[4] = Layout.nvdimmAlias + rng.below(8) * 0x1000 }
        for i in 6...9 {
            switch rng.below(10) {
            case 0: r.gpr[i] = 0x0000_8000_0000_0000 | (rng.next() & 0xFFF8)
            case 1: r.gpr[i] = 0x7000_0000 + rng.below(64) * 8
            default: r.gpr[i] = rng.pick(code) + rng.below(512) * 8
            }
        }
        r.gpr[1] = rng.chance(50) && !confined ? r.cr3 : (rng.chance(75) ? rng.pick(Array(code.prefix(Layout.pages))) : rng.pick(code)) + rng.below(512) * 8
        if confined { r.faultHandler = r.faultHandler == 0 ? 0 : (paging ? r.faultHandler : rng.pick(code)) }
        return r
    }
}
