import NPTCore
import NPTKit
import NPTScenarios
import NPTSimulator
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The backends under test: the simulator always; KVM through libnptkit-kvm.so (built beside the
/// test binary by `swift build`) where /dev/kvm is usable, else SKIPPED with the reason printed.
enum SwapBackends {
    /// The plugin beside the test binary (.../debug/NPTKitPackageTests.xctest).
    static let kvmPlugin: String? = {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        guard n > 0 else { return nil }
        let exe = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let p = String(exe[..<exe.lastIndex(of: "/")!]) + "/libnptkit-kvm.so"
        return access(p, R_OK) == 0 ? p : nil
    }()

    /// A registry with the simulator (its platform's host region needing WPQ flushing or not) and,
    /// where usable, the KVM plugin configured alike.
    static func registry(hostPMemNeedsFlush needs: Bool = true) throws -> BackendRegistry {
        let r = BackendRegistry()
        try r.register(SimulatorBackend(platform: .standard(needsWPQFlush: needs)), makeDefault: true)
        // The KVM plugin's host region kind: its argument pmem-needs-flush.
        if kvmSkipped == nil, let p = kvmPlugin {
            try NPTKitRuntime.loadPlugin(p, arguments: [PluginArgument(key: "pmem-needs-flush", value: needs ? "1" : "0")], into: r)
        }
        return r
    }

    /// Why the KVM half is skipped (nil: it runs).
    static let kvmSkipped: String? = {
        guard let p = kvmPlugin else { return "libnptkit-kvm.so is not beside the test binary" }
        let r = BackendRegistry()
        do {
            try NPTKitRuntime.loadPlugin(p, into: r)
            let vm = try NPTKitRuntime.makeVM(config: VMConfig(ramSize: 1 << 20, mbecMode: .lazy, backendName: "kvm"), registry: r)
            try NPTKitRuntime.destroyVM(vm)
            return nil
        } catch {
            return "no usable /dev/kvm: \(error)"
        }
    }()

    static func host(_ registry: BackendRegistry, _ name: String) throws -> ScenarioHost {
        try ScenarioHost(registry: registry, backendName: name,
                         makeVM: { c, r throws(NPTError) in try NPTKitRuntime.makeVM(config: c, registry: r) },
                         destroyVM: { vm throws(NPTError) in try NPTKitRuntime.destroyVM(vm) })
    }

    /// The backends to run on, in `registry`.
    static func hosts(_ registry: BackendRegistry) throws -> [ScenarioHost] {
        if let why = kvmSkipped { print("BackendSwapTests: the kvm half is SKIPPED: \(why)") }
        return try (kvmSkipped == nil ? ["sim", "kvm"] : ["sim"]).map { try host(registry, $0) }
    }
}

/// One scenario, every backend: each scenario of the library runs, through the same driver, on
/// the simulator and on KVM, and gives the same observable outcome (issue 12). Where a backend
/// differs for a documented reason (its capabilities, what it can count, a power cut it cannot
/// model), the test asserts the difference as such.
@Suite(.serialized) struct BackendSwapTests {
    /// The access and permission bits of a qualification (what every backend reports; the
    /// linear-address bits need NPT_CAP_LINEAR_MODE_INFO).
    static func bits(_ q: ViolationQualification) -> ViolationQualification {
        q.intersection([.read, .write, .fetch, .readable, .writable, .executable, .userExecutable])
    }
    static func expectedBits(_ p: EPTPermissions) -> ViolationQualification {
        ViolationQualification.mbec(access: .fetch, policy: p, linear: [])
    }

    struct HVCISummary: Equatable, CustomStringConvertible {
        var printed: [UInt64]
        var violations: [String]
        var faults: [String]
        var attacksSucceeded: Int
        var halted: Bool
        var description: String { "printed \(printed), violations \(violations), faults \(faults), attacks that ran \(attacksSucceeded), halted \(halted)" }
    }

    @Test func hvciScenarioGivesTheSameOutcomeOnEveryBackend() throws {
        let registry = try SwapBackends.registry()
        var summaries: [String: HVCISummary] = [:]
        for host in try SwapBackends.hosts(registry) {
            let mode = try #require(host.strongestMode)
            let image = try HVCIScenario.image(for: host.guestISA)
            let (o, stats) = try HVCIScenario(syscalls: 7).run(host: host, mode: mode)
            let name = host.backend.name
            #expect(o.printed == (1...7).map { UInt64($0) }, "\(name)")
            #expect(o.halted, "\(name)")
            #expect(o.attacksSucceeded == 0, "\(name): an attack ran guest code")
            try #require(o.violations.count == 2, "\(name): \(o.violations)")
            // Each violation is in the page its attack targets, at the attacker's privilege level,
            // reported with the access and the page's policy as hardware MBEC would.
            for (x, (attack, cpl)) in zip(o.violations, zip(image.attacks, [UInt32(3), 0])) {
                let range = try #require(image.policy.first { $0.label == attack.target })
                #expect(range.range.range.contains(x.gpa), "\(name): \(x) is not in the \(attack.target)")
                #expect(x.cpl == cpl, "\(name): \(x)")
                #expect(Self.bits(x.violation) == Self.expectedBits(range.range.permissions), "\(name): \(x)")
                if host.capabilities.contains(.linearModeInfo) {
                    #expect(x.violation.contains(.linearValid) && x.gva.raw == attack.linear, "\(name): \(x)")
                }
            }
            // The guest kernel saw both as #VE, at the addresses the attacks fetched.
            #expect(o.faultsSeenByGuest.map(\.vector) == [20, 20], "\(name)")
            #expect(o.faultsSeenByGuest.map(\.rip) == image.attacks.map(\.linear), "\(name)")
            #expect(stats.violationsReported == 2, "\(name)")
            summaries[name] = HVCISummary(
                printed: o.printed,
                violations: o.violations.map { "\(image.policy.label(of: $0.gpa) ?? "?") cpl \($0.cpl) \(hex(Self.bits($0.violation).rawValue))" },
                faults: zip(o.faultsSeenByGuest, image.attacks).map { "\($0.0.vector) at \($0.1.target)" },
                attacksSucceeded: o.attacksSucceeded, halted: o.halted)
            print("BackendSwapTests: HVCI on \(name) (mode \(mode)): \(summaries[name]!); \(stats.exitsTotal) exits")
        }
        if let kvm = summaries["kvm"] { #expect(kvm == summaries["sim"]) }
    }

    @Test func entryAttackOutcomesPerModeMatchTheCapabilities() throws {
        let registry = try SwapBackends.registry()
        var outcomes: [String: [String]] = [:]
        for host in try SwapBackends.hosts(registry) {
            let image = try HVCIScenario.image(for: host.guestISA)
            let jit = try #require(image.policy.first { $0.label == HVCIScenario.Label.jit })
            let name = host.backend.name
            for mode in VMConfig.MBECMode.allCases {
                let (o, stats) = try EntryAttackScenario().run(host: host, mode: mode)
                let kept = mode.requiredCapabilities.isSubset(of: host.capabilities)
                var kind = ""
                switch o {
                case .refused(let e):
                    kind = "refused"
                    #expect(!kept, "\(name) \(mode): refused though its capabilities keep it: \(e)")
                    #expect(e.code == .guarantee)
                case .stopped(let x):
                    kind = "stopped"
                    #expect(kept && mode != .violationOnly, "\(name) \(mode): stopped")
                    #expect(jit.range.range.contains(x.gpa) && x.cpl == 0, "\(name) \(mode): \(x)")
                    #expect(Self.bits(x.violation) == Self.expectedBits(jit.range.permissions), "\(name) \(mode): \(x)")
                    #expect((stats?.exitsEscalation ?? 0) >= 1, "\(name) \(mode): stopped without an escalation exit")
                case .ran(let cpl, _, let hierarchy):
                    kind = "ran"
                    #expect(mode == .violationOnly && cpl == 0 && hierarchy == .user, "\(name) \(mode): ran at cpl \(cpl) under \(hierarchy)")
                }
                #expect(EntryAttackScenario.keepsPromise(o, mode: mode), "\(name) \(mode): \(o)")
                outcomes[name, default: []].append(kind)
                print("BackendSwapTests: entry attack on \(name), mode \(mode): \(kind)")
            }
        }
        // Where both backends keep a mode they give the same outcome; exact is refused on KVM for
        // the capabilities it lacks (asserted above), stopped on the simulator.
        if let kvm = outcomes["kvm"], let sim = outcomes["sim"] {
            #expect(kvm == ["refused", "stopped", "ran"])
            #expect(sim == ["stopped", "stopped", "ran"])
        }
    }

    @Test func privilegedModeKeepsItsInvariantsOnEveryBackend() throws {
        let registry = try SwapBackends.registry()
        for host in try SwapBackends.hosts(registry) {
            let name = host.backend.name
            try #require(host.capabilities.contains(.privilegedMode), "\(name)")
            let s = PrivilegedScenario(cpus: 3, requests: 3, bursts: 2, seed: 5, pauseNanos: 1_000_000)
            let o = try s.run(host: host, mode: try #require(host.strongestMode))
            let n = 3 + 2 * 3
            #expect(o.requested == n, "\(name)")
            #expect(o.stats.entries == UInt64(n) && o.stats.requests == UInt64(n), "\(name): requests lost: \(o.stats)")
            #expect(o.failures == 0 && o.stats.failures == 0, "\(name)")
            #expect(o.handlerCounts == (1...UInt64(n)).map { $0 }, "\(name): handler counts \(o.handlerCounts)")
            #expect(o.wrongIndex == 0, "\(name): the handler ran on another vCPU than the requester")
            #expect(o.leaks == 0, "\(name): a vCPU outside the mode read the region")
            #expect(o.movedWhileVisible == 0, "\(name): a heartbeat moved while the region was visible")
            #expect(o.probes > 0 && o.probesBlocked == o.probes, "\(name): probes \(o.probes), blocked \(o.probesBlocked)")
            #expect(o.regionAbsentAfter, "\(name): the region stayed in a hierarchy")
            #expect(o.finalState.holder == -1 && o.finalState.queue.isEmpty, "\(name)")
            if o.instructionsCounted { #expect(o.outsideWhileVisible == 0, "\(name)") }
            if host.backend.isPlugin {
                // kvm's own statistics by name (npt_vm_backend_stats): told of each entry and leave
                // once (vcpu_enter/leave_privileged), each RSM reported, the probes answered all ones.
                let b = o.backendStatistics
                #expect(b.value("privileged_entries") == UInt64(n), "\(name): \(b)")
                #expect(b.value("privileged_leaves") == UInt64(n), "\(name): \(b)")
                #expect(b.value("rsm_exits") == UInt64(n), "\(name): \(b)")
                #expect((b.value("region_unbacked_reads") ?? 0) > 0, "\(name): \(b)")
            }
            print("BackendSwapTests: privileged mode on \(name): \(o.stats.entries) entries, \(o.probesBlocked) probes blocked, heartbeats \(o.heartbeats)")
        }
    }

    @Test(arguments: [true, false])
    func nvdimmRecordsReachTheMediaOnEveryBackend(needsWPQFlush: Bool) throws {
        let registry = try SwapBackends.registry(hostPMemNeedsFlush: needsWPQFlush)
        for host in try SwapBackends.hosts(registry) {
            let name = host.backend.name
            let records = 5
            // A log of its own per case (each registry loads the KVM plugin, with a backing file of its own).
            let s = NVDIMMScenario(needsWPQFlush: needsWPQFlush, records: records, tail: true,
                                   logOffset: needsWPQFlush ? 0 : NVDIMMScenario.logStride)
            let o = try s.run(host: host, mode: try #require(host.strongestMode))
            #expect(o.region.needsWPQFlush == needsWPQFlush, "\(name)")
            #expect(o.stale == 0, "\(name): the records were there before the run")
            #expect(o.durableAnnounced == records && o.storedOnlyAnnounced == 1 && o.fencedOnlyAnnounced == 1, "\(name)")
            #expect(o.readBack == records, "\(name): \(o.readBack) of \(records) records read back")
            // Trapped exactly where the region needs WPQ flushing: one exit per guest flush, each
            // written to every flush target behind the region.
            #expect(o.trapped == needsWPQFlush, "\(name)")
            #expect(o.stats.exits == (needsWPQFlush ? UInt64(records) : 0), "\(name): \(o.stats)")
            #expect(o.stats.guestFlushes == o.stats.exits, "\(name)")
            #expect(o.stats.physicalFlushes == (needsWPQFlush ? UInt64(records * o.region.flushTargets.count) : 0), "\(name): \(o.stats)")
            // What reached the media, where the backend models a power failure (the simulator;
            // KVM cannot cut its backing file's power: documented, asserted as such).
            if o.powerFailureModelled {
                #expect(o.survived == records, "\(name): \(o.survived) of \(records) durable records survived")
                #expect(o.storedOnlySurvived == 0, "\(name): a record never written back survived")
                #expect(o.fencedOnlySurvived == (needsWPQFlush ? 0 : 1), "\(name): the fenced record on \(needsWPQFlush ? "a WPQ lost" : "ADR")")
            } else {
                #expect(!host.capabilities.isEmpty && name != "sim", "the simulator models a power failure")
            }
            if let crash = o.crash { #expect(crash.losses.isEmpty, "\(name): \(crash.losses.prefix(3))") }
            print("BackendSwapTests: NVDIMM on \(name), region \(o.region.id) \(needsWPQFlush ? "needs" : "needs no") WPQ flushing: "
                  + "\(o.stats.exits) flush exits, \(o.stats.physicalFlushes) physical flushes, \(o.readBack)/\(records) read back, "
                  + (o.powerFailureModelled ? "\(o.survived)/\(records) survived the power failure" : "no power failure modelled")
                  + (o.crash.map { ", crash checker: \($0.crashPoints) crash points, \($0.losses.count) losses" } ?? ""))
        }
    }

    /// A backend wrapper (`WithheldCapabilities`, a `BackendWrapper`) keeps the real backend's
    /// persistence model in reach: the NVDIMM scenario's crash checker runs behind it (it would be
    /// nil if `unwrapped` stopped at the wrapper) and finds what it finds on the simulator itself.
    @Test func theCrashCheckerSeesTheSimulatorBehindAWrapper() throws {
        let registry = try SwapBackends.registry()
        let sim = try registry.lookup("sim")
        let weaker = WithheldCapabilities(sim, withholding: [.exitOnEscalation, .exitOnReturn], name: "sim without privilege-change exits")
        try registry.register(weaker)
        #expect(weaker.unwrapped === sim)
        let s = NVDIMMScenario(needsWPQFlush: true, records: 4, tail: true)
        let direct = try s.run(host: try SwapBackends.host(registry, "sim"), mode: .violationOnly)
        let wrapped = try s.run(host: try SwapBackends.host(registry, weaker.name), mode: .violationOnly)
        let a = try #require(direct.crash), b = try #require(wrapped.crash, "no crash checker behind the wrapper")
        #expect(b.crashPoints > 0 && b.losses.isEmpty)
        #expect(a.crashPoints == b.crashPoints && a.durableStores == b.durableStores)
    }

    /// A scenario has an image for the simulator's ISA and x86-64 only: another ISA is refused
    /// with a message naming the scenario and the ISA.
    /// The plugin's arguments (plugin interface 2): an unknown key or a bad value is refused with the
    /// plugin's reason in the error, and nothing is registered; the documented ones are taken. Needs
    /// the plugin file only, not /dev/kvm.
    @Test func kvmPluginRefusesUnknownAndBadArguments() throws {
        guard let p = SwapBackends.kvmPlugin else { print("BackendSwapTests: SKIPPED: libnptkit-kvm.so is not beside the test binary"); return }
        let bad: [(String, String, String)] = [("bogus", "1", "unknown argument 'bogus'"), ("pmem-size", "4097", "pmem-size=4097"),
                                               ("pmem-needs-flush", "2", "pmem-needs-flush=2"), ("pmem-dir", "/nonexistent", "pmem-dir=/nonexistent"),
                                               ("nd-root", "sys", "nd-root=sys")]
        for (key, value, mention) in bad {
            let r = BackendRegistry()
            do {
                try NPTKitRuntime.loadPlugin(p, arguments: [PluginArgument(key: key, value: value)], into: r)
                Issue.record("\(key)=\(value) was accepted")
            } catch {
                #expect(error.code == .invalidArgument, "\(key)=\(value): \(error)")
                #expect(error.message.contains(mention), "\(key)=\(value): \(error.message)")
            }
            #expect(r.all.isEmpty, "\(key)=\(value): something was registered")
        }
        let r = BackendRegistry()
        let name = try NPTKitRuntime.loadPlugin(p, arguments: [PluginArgument(key: "pmem-dir", value: "/tmp"), PluginArgument(key: "pmem-size", value: "0x100000"),
                                                               PluginArgument(key: "nd-root", value: "/nonexistent"), PluginArgument(key: "pmem-needs-flush", value: "0")],
                                                into: r)
        #expect(name == "kvm")
    }

    @Test func anISAWithoutAnImageIsRefusedByName() throws {
        for isa in [GuestISA.none, .unknown] {
            do {
                _ = try HVCIScenario.image(for: isa)
                Issue.record("an image for \(isa)")
            } catch {
                #expect(error.code == .unsupported)
                #expect(error.message.contains("HVCI-like MBEC") && error.message.contains("\(isa)"), "\(error.message)")
            }
            #expect(throws: NPTError.self) { try PrivilegedScenario.image(for: isa, cpus: 1) }
            #expect(throws: NPTError.self) { try NVDIMMScenario.image(for: isa) }
        }
    }

    /// Both ISAs' images follow one protocol: the same labels, the same attacks' targets.
    @Test func bothImagesCarryTheSameLabelsAndAttacks() throws {
        let sim = try HVCIScenario.image(for: .simulator), x86 = try HVCIScenario.image(for: .x86_64)
        #expect(sim.attacks.map(\.target) == x86.attacks.map(\.target))
        #expect(sim.attacks.map(\.what) == x86.attacks.map(\.what))
        for label in [HVCIScenario.Label.kernelCode, HVCIScenario.Label.driver, HVCIScenario.Label.userCode, HVCIScenario.Label.jit] {
            let a = sim.policy.first { $0.label == label }?.range.permissions, b = x86.policy.first { $0.label == label }?.range.permissions
            #expect(a != nil && a == b, "\(label): \(String(describing: a)) vs \(String(describing: b))")
        }
    }
}
