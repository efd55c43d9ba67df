import MBECReference
import NPTCore
import NPTSimulator
import NPTScenarios

/// The differential test of the MBEC emulation (shadow hierarchies, exits and the core's decisions,
/// on the simulator) against `ReferenceMBEC`, a model of hardware MBEC written from the SDM that
/// shares no code with the emulation. Random guest page tables (4 KiB, 2 MiB and 1 GiB pages, random
/// U/S, R/W, XD and accessed/dirty flags at every level, a few reserved bits), random policies
/// (also on the page tables themselves, on NVDIMM ranges and on the privileged-mode region), random
/// programs that write their own page tables, random machine states (paging off, CR0.WP, EFER.NXE,
/// SMEP, SMAP with RFLAGS.AC), policy changes while the vCPU runs, VMM-injected interrupts,
/// privileged-mode entries, backends without escalation or return exits. Every step's outcome,
/// register file and memory writes are compared. A divergence is classified (a documented class of
/// the mode, README "Where the emulation differs from hardware MBEC"), counted, both machines are
/// brought back to the reference's state, and the episode goes on; an unclassified one is a failure.
package enum DivergenceClass: String, CaseIterable, Sendable {
    /// Lazy and violation-only modes: after a return to user mode the supervisor hierarchy stays
    /// exposed, so user code runs a supervisor-execute-only page mapped at a user-mode address.
    case staleSupervisorAtCPL3
    /// Violation-only mode: after an entry to the kernel (no escalation exit) the user hierarchy
    /// stays exposed, so kernel code runs a user-execute-only page (ret2dir through the IDT).
    case staleUserAtCPL0
    /// SMEP off: the supervisor fetches from a user-mode address, which hardware MBEC governs by Xu
    /// while lazy and violation-only modes choose by privilege level and exact mode's supervisor
    /// hierarchy (no violation to correct it) exposes Xs.
    case smepOffUserAddress
    /// SMEP off, exact mode: after such a fetch switched to the user hierarchy, supervisor code at a
    /// supervisor address runs under it until a violation switches back.
    case smepOffUserHierarchyAtCPL0
}

package struct DifferentialConfig: Sendable {
    package var mode: VMConfig.MBECMode
    package var smep: Bool
    /// Capabilities the simulator pretends not to have (`.exitOnEscalation`, `.exitOnReturn`).
    package var withoutExits: BackendCapabilities
    package var privilegedRegion: Bool
    package var nvdimm: Bool
    package init(mode: VMConfig.MBECMode, smep: Bool, withoutExits: BackendCapabilities = [],
                privilegedRegion: Bool = true, nvdimm: Bool = true) {
        self.mode = mode; self.smep = smep; self.withoutExits = withoutExits
        self.privilegedRegion = privilegedRegion; self.nvdimm = nvdimm
    }
    package var name: String {
        var s = "\(mode) smep=\(smep)"
        if !withoutExits.isEmpty {
            s += " without " + [(BackendCapabilities.exitOnEscalation, "escalation"), (.exitOnReturn, "return")]
                .filter { withoutExits.contains($0.0) }.map(\.1).joined(separator: "+") + " exits"
        }
        return s
    }
    /// The divergence classes a configuration may show (anything else fails).
    package var allowed: Set<DivergenceClass> {
        var a: Set<DivergenceClass> = []
        switch mode {
        case .exact: if !smep { a.formUnion([.smepOffUserAddress, .smepOffUserHierarchyAtCPL0]) }
        case .lazy: a.insert(.staleSupervisorAtCPL3); if !smep { a.insert(.smepOffUserAddress) }
        case .violationOnly:
            a.formUnion([.staleSupervisorAtCPL3, .staleUserAtCPL0]); if !smep { a.insert(.smepOffUserAddress) }
        }
        return a
    }
}

/// What a run exercised and found.
package struct DifferentialReport: Sendable {
    package var steps = 0
    package var divergences: [DivergenceClass: Int] = [:]
    package var unclassified: [String] = []
    package var policyChanges = 0
    package var injections = 0
    package var privilegedEntries = 0
    package var structureViolations = 0      // EPT violations on a paging-structure access (bit 8 clear)
    package var accessedDirtyViolations = 0  // of which on an A/D update (a write)
    package var pageTableWrites = 0          // guest stores into its own page tables
    package var pagingOffSteps = 0
    package var wpOffSteps = 0
    package var nxeOffSteps = 0
    package var smapSteps = 0
    package var reservedBitFaults = 0
    package var largePageSteps = 0           // steps whose fetch went through a 1 GiB guest page
    package var nvdimmAccesses = 0
    package var supervisorOnlyAtUserAddressAfterReturn = 0
    package var vcpusCreated = 0
    package init() {}

    package mutating func add(_ o: DifferentialReport) {
        steps += o.steps
        for (c, n) in o.divergences { divergences[c, default: 0] += n }
        unclassified += o.unclassified
        policyChanges += o.policyChanges; injections += o.injections; privilegedEntries += o.privilegedEntries
        structureViolations += o.structureViolations; accessedDirtyViolations += o.accessedDirtyViolations
        pageTableWrites += o.pageTableWrites; pagingOffSteps += o.pagingOffSteps; wpOffSteps += o.wpOffSteps
        nxeOffSteps += o.nxeOffSteps; smapSteps += o.smapSteps; reservedBitFaults += o.reservedBitFaults
        largePageSteps += o.largePageSteps; nvdimmAccesses += o.nvdimmAccesses
        supervisorOnlyAtUserAddressAfterReturn += o.supervisorOnlyAtUserAddressAfterReturn
        vcpusCreated += o.vcpusCreated
    }

    package var summary: String {
        let d = divergences.map { "\($0.key.rawValue)=\($0.value)" }.sorted().joined(separator: " ")
        return "\(steps) steps; divergences [\(d)] unclassified \(unclassified.count); policy changes \(policyChanges), "
            + "injected \(injections), privileged entries \(privilegedEntries), paging-structure violations \(structureViolations) "
            + "(A/D \(accessedDirtyViolations)), page-table writes \(pageTableWrites), steps with paging off \(pagingOffSteps), "
            + "WP=0 \(wpOffSteps), NXE=0 \(nxeOffSteps), SMAP \(smapSteps), reserved-bit #PF \(reservedBitFaults), "
            + "1 GiB-page fetches \(largePageSteps), NVDIMM accesses \(nvdimmAccesses), Xs-only at user address after return "
            + "\(supervisorOnlyAtUserAddressAfterReturn), vCPUs created \(vcpusCreated)"
    }
}

/// A deterministic random source: the package's SplitMix64, with the harness's helpers (the seed
/// offset keeps every seed's sequence what it was when the harness had its own copy).
package struct Rand: RandomNumberGenerator, Sendable {
    var g: SplitMix64
    package init(seed: UInt64) { g = SplitMix64(seed: seed &+ 0x9E37_79B9_7F4A_7C15) }
    package mutating func next() -> UInt64 { g.next() }
    mutating func below(_ n: UInt64) -> UInt64 { next() % n }
    mutating func chance(_ percent: UInt64) -> Bool { next() % 100 < percent }
    mutating func pick<T>(_ a: [T]) -> T { a[Int(below(UInt64(a.count)))] }
}

// MARK: conversions between the two machines

extension ReferenceCPU {
    package init(_ r: Registers) {
        self.init()
        cpl = r.cpl; rip = r.rip; rflags = r.rflags; gpr = r.gpr
        cr0 = r.cr0; cr2 = r.cr2; cr3 = r.cr3; cr4 = r.cr4; efer = r.efer; lstar = r.lstar; faultHandler = r.faultHandler
    }
    package var registers: Registers {
        var r = Registers()
        r.cpl = cpl; r.rip = rip; r.rflags = rflags; r.gpr = gpr
        r.cr0 = cr0; r.cr2 = cr2; r.cr3 = cr3; r.cr4 = cr4; r.efer = efer; r.lstar = lstar; r.faultHandler = faultHandler
        return r
    }
}

extension ReferenceOutcome {
    /// The reference outcome an exit of `VirtualCPU.run` (budget 1) corresponds to.
    package init?(_ x: VMExit) {
        switch x.reason {
        case .budget: self = .stepped
        case .io: self = .io(port: x.ioPort, value: x.ioValue)
        case .halt: self = .halt
        case .mbecViolation: self = .violation(gpa: x.gpa.raw, gla: x.gva.raw, qualification: x.qualification)
        case .guestFault: self = .guestFault(vector: x.vector, error: x.qualification, address: x.gva.raw)
        default: return nil
        }
    }
    package var stopsProgress: Bool {
        switch self { case .violation, .guestFault, .halt: true; default: false }
    }
    /// A fetch violation: its address and whether the linear address was user-mode.
    package var fetchViolation: (gpa: UInt64, user: Bool)? {
        if case .violation(let g, _, let q) = self, q & 4 != 0 { return (g, q & (1 << 9) != 0) }
        return nil
    }
    /// The instruction at `pre.rip` was fetched (whatever it then did).
    func fetched(_ pre: ReferenceCPU) -> Bool {
        let rip = pre.rip
        switch self {
        case .violation(_, let gla, let q):
            // A fetch violation, or a violation reading a paging-structure entry for the fetch.
            return !(gla == rip && (q & 4 != 0 || (q & (1 << 8) == 0 && q & 1 != 0)))
        case .guestFault(let v, let e, let a):
            guard a == rip else { return true }
            let top = rip >> 47
            if v == 13 { return !(rip & 7 != 0 || (top != 0 && top != 0x1FFFF)) }
            guard v == 14 else { return true }
            // The I/D flag says it when SMEP or NXE is on; otherwise a #PF at rip that is not a write
            // is taken as the fetch's.
            if pre.cr4 & (1 << 20) != 0 || pre.efer & (1 << 11) != 0 { return e & 16 == 0 }
            return e & 2 != 0
        default: return true
        }
    }
}
