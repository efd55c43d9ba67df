import CScenarioGuests
import NPTCore
import NPTSimulator

/// A guest image of the NVDIMM durability scenario for one guest ISA (protocol NVDIMM_* of
/// `Guests/include/scenario_protocol.h`).
package struct NVDIMMImage: ScenarioImage {
    package var guest: GuestSetup
    /// A vCPU's state at entry (the driver sets rip and the protocol's registers).
    package var entry: Registers
    /// The durable records only; the records then the tail.
    package var loopEntry: UInt64
    package var tailEntry: UInt64
    /// Where the guest's paging lets it reach the NVDIMM range.
    package var nvdimmGPA: UInt64
    package var nvdimmSize: UInt64
    /// The write-back instruction the guest uses.
    package var writeBack: String
}

/// A backend whose persistent memory is a model the scenario can watch (every persistence event,
/// and what a power failure would leave at each): the crash checker runs on it. Others do not
/// expose one; the outcome says so.
package protocol ObservablePersistence: Backend {
    var persistenceModel: PersistentPlatform { get }
}

extension SimulatorBackend: ObservablePersistence {
    package var persistenceModel: PersistentPlatform { platform }
}

/// The NVDIMM durability scenario: each of `cpus` vCPUs appends `records` records {magic, i} to its
/// own log in an NVDIMM range backed by a host region that needs WPQ flushing (or one that does not:
/// `needsWPQFlush`), making each durable by the documented protocol (store, write-back, SFENCE, a
/// write to the virtual flush hint) and announcing it; with `tail` it then writes one record it only
/// stores and one it writes back and fences but does not flush. Then: the flush statistics, the
/// records read back, and, where the backend models one, a power failure and what survived it
/// (and, where the backend exposes its persistence model, a crash checker that treats every
/// persistence event as a possible power failure). One driver for every backend.
package struct NVDIMMScenario: Sendable {
    package static let name = "NVDIMM durability"
    /// Each vCPU's log: this far from the previous one.
    package static let logStride: UInt64 = 0x4000

    /// The protocol's ports and record (NVDIMM_* of scenario_protocol.h).
    package enum Port {
        package static let durable = NVDIMM_PORT_DURABLE
        package static let storedOnly = NVDIMM_PORT_STORED_ONLY
        package static let fencedOnly = NVDIMM_PORT_FENCED_ONLY
    }
    package static let recordMagic = UInt64(NVDIMM_RECORD_MAGIC)

    /// Which kind of host region backs the range.
    package var needsWPQFlush: Bool
    /// The flush options to set (nil: the VM's own).
    package var options: FlushOptions?
    package var cpus: Int
    package var records: Int
    package var tail: Bool
    /// Where the logs start in the range (a backend whose media outlives the VM: use fresh lines).
    package var logOffset: UInt64

    package init(needsWPQFlush: Bool = true, options: FlushOptions? = nil, cpus: Int = 1, records: Int = 4,
                tail: Bool = true, logOffset: UInt64 = 0) {
        self.needsWPQFlush = needsWPQFlush; self.options = options; self.cpus = cpus; self.records = records
        self.tail = tail; self.logOffset = logOffset
    }

    package static func image(for isa: GuestISA) throws(NPTError) -> NVDIMMImage {
        try Scenarios.image(name, for: isa, simulator: NVDIMMSim.image, x86_64: NVDIMMX86.image)
    }

    /// The first host region of the kind asked for.
    package static func hostRegion(_ vm: VirtualMachine, needsWPQFlush: Bool) throws(NPTError) -> HostPersistence.Region {
        guard let r = try vm.hostPersistence().regions.first(where: { $0.needsWPQFlush == needsWPQFlush }) else {
            throw NPTError(.unsupported, "backend '\(vm.backend.name)' offers no host persistent-memory region that "
                           + (needsWPQFlush ? "needs" : "does not need") + " WPQ flushing")
        }
        return r
    }

    func log(_ image: NVDIMMImage, cpu: Int) -> UInt64 { image.nvdimmGPA + logOffset + UInt64(cpu) * NVDIMMScenario.logStride }
    /// Where vCPU `cpu` writes its record `k`.
    package func recordGPA(_ image: NVDIMMImage, cpu: Int, _ k: Int) -> UInt64 {
        log(image, cpu: cpu) + UInt64(k) * UInt64(NVDIMM_RECORD_STRIDE)
    }

    /// Adds the NVDIMM range (backed by the host region asked for), loads the image and creates the
    /// vCPUs, their registers set.
    package func setUp(_ vm: VirtualMachine) throws(NPTError) -> [VirtualCPU] {
        let image = try NVDIMMScenario.image(for: vm.guestISA)
        let needed = logOffset + UInt64(cpus) * NVDIMMScenario.logStride
        guard records >= 1, UInt64(records + 2) * UInt64(NVDIMM_RECORD_STRIDE) <= NVDIMMScenario.logStride, needed <= image.nvdimmSize else {
            throw NPTError(.invalidArgument, "scenario '\(NVDIMMScenario.name)': \(cpus) logs of \(records) records from offset \(hex(logOffset)) do not fit")
        }
        if vm.nvdimmRanges.isEmpty {
            let region = try NVDIMMScenario.hostRegion(vm, needsWPQFlush: needsWPQFlush)
            try vm.addNVDIMM(gpa: GPA(image.nvdimmGPA), size: image.nvdimmSize, hostRegion: region.id, regionOffset: 0)
        }
        if let options { try vm.setFlushOptions(options) }
        guard let vfha = vm.virtualFlushHint else { throw NPTError(.state, "no vFHA") }
        try Scenarios.load(vm, memory: image.memory, policy: image.policy.ranges)
        var out: [VirtualCPU] = []
        for c in 0..<cpus {
            let v = try vm.makeVCPU(index: UInt32(c))
            var r = image.entry
            r.rip = tail ? image.tailEntry : image.loopEntry
            r.gpr[Int(NVDIMM_REG_AREA)] = log(image, cpu: c)
            r.gpr[Int(NVDIMM_REG_VFHA)] = vfha.raw
            r.gpr[Int(NVDIMM_REG_COUNT)] = UInt64(records)
            try v.setRegisters(r)
            out.append(v)
        }
        return out
    }

    /// Runs `v` until HLT; returns the (port, value) pairs it reported.
    @discardableResult
    package static func runToHalt(_ v: VirtualCPU) throws(NPTError) -> [(port: Int32, value: UInt64)] {
        var out: [(port: Int32, value: UInt64)] = []
        while true {
            let x = try v.run()
            switch x.reason {
            case .io: out.append((Int32(truncatingIfNeeded: x.ioPort), x.ioValue))
            case .halt: return out
            case .budget, .kicked: continue
            default: throw Scenarios.unexpected(name, x, cpu: v.index)
            }
        }
    }

    package struct Outcome: Sendable {
        package var region = HostPersistence.Region(id: 0, base: 0, size: 0)
        package var trapped = false
        package var stats = FlushStatistics()
        package var records = 0
        /// Records announced durable, and the tail's records announced (every vCPU together).
        package var durableAnnounced = 0
        package var storedOnlyAnnounced = 0
        package var fencedOnlyAnnounced = 0
        /// Record lines that held their record before the guest ran (then the read-back proves nothing).
        package var stale = 0
        /// Durable records intact, read through the VM after the run.
        package var readBack = 0
        /// Whether the backend models a power failure; then what survived it.
        package var powerFailureModelled = false
        package var survived = 0
        package var storedOnlySurvived = 0
        package var fencedOnlySurvived = 0
        /// The crash checker's report, where the backend exposes its persistence model.
        package var crash: CrashChecker.Report?
    }

    /// Whether the VM sees vCPU `cpu`'s record `k` intact.
    package func holdsRecord(_ vm: VirtualMachine, cpu: Int, _ k: Int) throws(NPTError) -> Bool {
        try intact(vm, try NVDIMMScenario.image(for: vm.guestISA), cpu: cpu, k)
    }

    func intact(_ vm: VirtualMachine, _ image: NVDIMMImage, cpu: Int, _ k: Int) throws(NPTError) -> Bool {
        let a = recordGPA(image, cpu: cpu, k)
        let magic = try Scenarios.read64(vm, a), index = try Scenarios.read64(vm, a + 8)
        return magic == UInt64(NVDIMM_RECORD_MAGIC) && index == UInt64(k)
    }

    func count(_ vm: VirtualMachine, _ image: NVDIMMImage, _ ks: Range<Int>) throws(NPTError) -> Int {
        var n = 0
        for c in 0..<cpus {
            for k in ks { if try intact(vm, image, cpu: c, k) { n += 1 } }
        }
        return n
    }

    /// Runs the scenario on `vm` (a backend with NPT_CAP_PERSISTENT_MEMORY), one vCPU after the other.
    package func run(on vm: VirtualMachine) throws(NPTError) -> Outcome {
        let image = try NVDIMMScenario.image(for: vm.guestISA)
        var o = Outcome()
        o.records = cpus * records
        o.region = try NVDIMMScenario.hostRegion(vm, needsWPQFlush: needsWPQFlush)
        let vcpus = try setUp(vm)
        let all = 0..<(records + (tail ? 2 : 0))
        o.stale = try count(vm, image, all)
        // Through any wrapper (WithheldCapabilities): the model is the real backend's.
        let checker = (vm.backend.unwrapped as? ObservablePersistence).map { CrashChecker(platform: $0.persistenceModel) }
        for v in vcpus {
            for (port, _) in try NVDIMMScenario.runToHalt(v) {
                switch port {
                case NVDIMM_PORT_DURABLE: o.durableAnnounced += 1
                case NVDIMM_PORT_STORED_ONLY: o.storedOnlyAnnounced += 1
                case NVDIMM_PORT_FENCED_ONLY: o.fencedOnlyAnnounced += 1
                default: throw NPTError(.state, "scenario '\(NVDIMMScenario.name)': vCPU \(v.index) reported on port \(hex(UInt64(UInt32(bitPattern: port))))")
                }
            }
        }
        o.crash = checker?.stop()
        o.trapped = vm.flushHintTrapped
        o.stats = vm.flushStatistics()
        o.readBack = try count(vm, image, 0..<records)
        do throws(NPTError) {
            try vm.powerFailure()
            o.powerFailureModelled = true
        } catch where error.code == .unsupported {
            return o
        }
        o.survived = try count(vm, image, 0..<records)
        if tail {
            o.storedOnlySurvived = try count(vm, image, records..<(records + 1))
            o.fencedOnlySurvived = try count(vm, image, (records + 1)..<(records + 2))
        }
        return o
    }

    /// Runs the scenario on a VM of `host` in `mode`.
    package func run(host: ScenarioHost, mode: VMConfig.MBECMode) throws -> Outcome {
        let image = try NVDIMMScenario.image(for: host.guestISA)
        return try host.withVM(image.config(mode: mode)) { vm in try run(on: vm) }
    }
}
