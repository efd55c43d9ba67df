import ArgumentParser
import NPTCore
import NPTKit
import NPTSimulator
#if canImport(Glibc)
import Glibc
#endif

@main
struct NPTKitCLI: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nptkit",
        abstract: "Memory-virtualization controls hypervisors need and hardware does not always give.",
        subcommands: [Demo.self, Backends.self, Bench.self, Nfit.self, HostPMem.self, WhatIf.self, TraceDump.self],
        defaultSubcommand: Demo.self)
}

struct BackendOptions: ParsableArguments {
    @Option(help: "Backend to run on (see `backends`).")
    var backend: String = "sim"
    @Option(help: "Backend plugin (.so) to load first; repeatable.")
    var plugin: [String] = []
    @Option(name: .customLong("backend-opt"), help: ArgumentHelp("An argument for the plugins this command loads (KEY=VALUE; repeatable), e.g. pmem-dir=/dev/shm for kvm.", valueName: "key=value"))
    var backendOpt: [String] = []

    func pluginArguments() throws -> [PluginArgument] {
        try backendOpt.map { text in
            guard let a = PluginArgument(parsing: text) else { throw ValidationError("--backend-opt '\(text)' is not KEY=VALUE") }
            return a
        }
    }

    func registry() throws -> BackendRegistry {
        let r = NPTKitRuntime.makeRegistry()
        let args = try pluginArguments()
        for p in plugin { try NPTKitRuntime.loadPlugin(p, arguments: args, into: r) }
        // The backend plugins built beside this binary are found without --plugin.
        if !r.all.contains(where: { $0.name == backend }), let dir = executableDirectory() {
            let path = dir + "/libnptkit-\(backend).so"
            if access(path, R_OK) == 0 { try NPTKitRuntime.loadPlugin(path, arguments: args, into: r) }
        }
        if !args.isEmpty, !r.all.contains(where: { $0.name == backend && $0.isPlugin }) {
            throw ValidationError("--backend-opt is for a plugin backend; '\(backend)' is built in")
        }
        guard r.all.contains(where: { $0.name == backend }) else {
            throw ValidationError("no backend '\(backend)' (registered: \(r.all.map(\.name).joined(separator: ", "))): libnptkit-\(backend).so is not beside this binary (`swift build` builds every product), or load one with --plugin PATH")
        }
        return r
    }
}

/// The directory of the running executable (/proc/self/exe).
func executableDirectory() -> String? {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    guard n > 0 else { return nil }
    let path = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    guard let slash = path.lastIndex(of: "/") else { return nil }
    return String(path[..<slash])
}

enum ModeArgument: String, ExpressibleByArgument, CaseIterable {
    case exact, lazy
    case violationOnly = "violation-only"
    var mode: VMConfig.MBECMode {
        switch self { case .exact: .exact; case .lazy: .lazy; case .violationOnly: .violationOnly }
    }
}

struct Backends: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List the registered backends.")
    @OptionGroup var options: BackendOptions

    func run() throws {
        let r = try options.registry()
        var t = Table(["name", "default", "plugin", "capabilities", "description"])
        for b in r.all {
            let caps: [(BackendCapabilities, String)] = [(.mbecEmulation, "mbec"), (.exitOnEscalation, "exit-escalate"),
                                                         (.exitOnReturn, "exit-return"), (.linearModeInfo, "linear-us"), (.run, "run"),
                                                         (.privilegedMode, "privileged"), (.persistentMemory, "pmem")]
            t.add([b.name, r.defaultName == b.name ? "yes" : "", b.isPlugin ? "yes" : "",
                   caps.filter { b.capabilities.contains($0.0) }.map(\.1).joined(separator: ","), b.summary])
        }
        print(t.render())
    }
}

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the HVCI-like MBEC scenario (a kernel, a user process making system calls, two attacks).")
    @OptionGroup var options: BackendOptions
    @Option(help: "MBEC emulation mode: exact (exit on return to user; the default) or lazy (the patent's minimum; the only one on kvm).")
    var mode: ModeArgument?
    @Option(help: "System calls the user process makes.")
    var syscalls: Int = 10

    func run() throws {
        let registry = try options.registry()
        if options.backend == "kvm" {
            // The KVM scenarios run the plugin's real x86-64 guests (DemoKVM.swift).
            try runKVM(registry: registry)
            return
        }
        let mode = self.mode ?? .exact
        print("NPTKit demo: emulated mode-based execute control on backend '\(options.backend)', mode \(mode.rawValue), guest SMEP on\n")
        print("Guest: an HVCI-like kernel and a user process. Policy (EPT bits R W Xs Xu), the rest of RAM R W:")
        var p = Table(["guest-physical", "what", "policy"])
        for r in HVCIScenario(syscalls: syscalls).policy {
            let what: String
            switch r.range.start.raw {
            case HVCIScenario.kernelCode: what = "kernel code"
            case HVCIScenario.userCode: what = "user code"
            case HVCIScenario.userJIT: what = "user JIT page (also at a kernel direct-map address)"
            default: what = "driver page, also mapped at a user-mode address"
            }
            p.add([hex(r.range.start.raw), what, r.permissions.description])
        }
        print(p.render())

        let (outcome, stats) = try runScenario(registry: registry, mode: mode.mode, syscalls: syscalls)
        print("\nGuest output (system call 'write'): \(outcome.printed.map(String.init).joined(separator: " "))")
        print("\nViolations stopped (reported to the VMM with an EPT-violation qualification, then injected as #VE):")
        var v = Table(["#", "attempt", "cpl", "linear address", "guest-physical", "access", "policy of page", "qualification"])
        for (i, x) in outcome.violations.enumerated() {
            let q = x.violation
            let who = x.cpl == 3 ? "user runs a supervisor-only page" : "kernel runs a user page"
            v.add(["\(i + 1)", who, "\(x.cpl)", hex(x.gva.raw), hex(x.gpa.raw),
                   q.contains(.fetch) ? "fetch" : q.contains(.write) ? "write" : "read",
                   policyText(q), "\(hex(q.rawValue)) \(qualText(q))"])
        }
        print(v.render())
        print("Attacks that ran guest code: \(outcome.attacksSucceeded)   Faults the guest kernel saw: \(outcome.faultsSeenByGuest.map { "vector \($0.vector) at \(hex($0.rip))" }.joined(separator: ", "))")

        print("\nExits by reason:")
        var e = Table(["reason", "count", "handled by"])
        e.add(["escalation (user -> supervisor)", "\(stats.exitsEscalation)", "core: expose supervisor hierarchy"])
        e.add(["return to user", "\(stats.exitsReturnToUser)", "core: expose user hierarchy"])
        e.add(["EPT violation", "\(stats.exitsEPTViolation)", "core: switch, or report (\(stats.violationsReported) reported)"])
        e.add(["IO (guest output)", "\(outcome.printed.count + 2 * outcome.faultsSeenByGuest.count)", "VMM"])
        e.add(["halt", outcome.halted ? "1" : "0", "VMM"])
        print(e.render())
        print("Hierarchy switches: \(stats.hierarchySwitches)   Guest instructions: \(stats.instructions)   TLB hits/misses: \(stats.tlbHits)/\(stats.tlbMisses)")

        // Exits per system-call round trip, isolated: the difference between two runs.
        let (_, longer) = try runScenario(registry: registry, mode: mode.mode, syscalls: syscalls + 100)
        let perCall = Double(mbecExits(longer) - mbecExits(stats)) / 100
        print("Exits per system-call round trip: \(fmt(perCall)) (mode \(mode.rawValue); the lower bound is 1, the escalation)")

        try entryAttackSection()

        if options.backend == "sim" {
            try privilegedSection(registry: registry)
            try nvdimmSection()
        }
    }

    /// Issue 9's attack in every mode, on the simulator and on the simulator without privilege-change
    /// exits (as this machine's KVM has none of its own): what each mode promises, and what happened.
    func entryAttackSection() throws {
        print("\n--- ret2dir through the kernel's entry, in every mode ---")
        print("An attacker with a kernel data write remaps the page of the system-call entry to the user JIT page")
        print("(user-execute only) at that supervisor-mode address; the user process then makes a system call. Hardware")
        print("MBEC refuses the kernel's first fetch there (a supervisor-mode address needs Xs).\n")
        var t = Table(["backend", "mode", "outcome"])
        var promisesKept = true
        for (name, without) in [("sim", BackendCapabilities()), ("sim without privilege-change exits", [.exitOnEscalation, .exitOnReturn])] {
            for mode in VMConfig.MBECMode.allCases {
                let registry = BackendRegistry()
                let sim = try SimulatorBackend(name: "sim", withoutExits: without)
                try registry.register(sim, makeDefault: true)
                let outcome: String
                do {
                    let vm = try VirtualMachine(config: VMConfig(ramSize: HVCIScenario.ram, mbecMode: mode), registry: registry)
                    defer { try? vm.destroy() }
                    switch try HVCIScenario().runEntryAttack(on: vm) {
                    case .stopped(let x):
                        outcome = "stopped: MBEC violation at \(hex(x.gpa.raw)), cpl \(x.cpl), \(policyText(x.violation)) \(qualText(x.violation))"
                        if mode == .violationOnly { promisesKept = false }
                    case .ran(let cpl, let rip, let h):
                        outcome = "RAN the JIT bytes at cpl \(cpl), rip \(hex(rip)), under the \(h) hierarchy"
                            + (mode == .violationOnly ? " (the gap this mode names)" : "")
                        if mode != .violationOnly { promisesKept = false }
                    }
                } catch let error as NPTError where error.code == .guarantee {
                    let missing = mode.requiredCapabilities.subtracting(sim.capabilities)
                    outcome = "refused up front (NPT_ERR_GUARANTEE): no \(missing.shortNames.joined(separator: ", "))"
                }
                t.add([name, mode.description, outcome])
            }
        }
        print(t.render())
        print("Every mode kept its promise: \(promisesKept ? "yes" : "NO") (exact and lazy stop it or are refused; violation-only names it as its gap)")
    }

    /// The privileged-mode section: 4 vCPU threads, requests raised concurrently.
    func privilegedSection(registry: BackendRegistry) throws {
        print("\n--- Privileged mode (SMM-like) with a secure global view ---")
        print("4 vCPUs on their own threads run a guest that bumps a heartbeat and tries to read the special region;")
        print("another thread raises 8 enter-mode interrupts on random vCPUs. The region's handler checks that no")
        print("heartbeat moves while it runs, counts its entry, and returns with RSM.\n")
        let vm = try VirtualMachine(config: VMConfig(ramSize: PrivilegedScenario.ram, maxStepsPerRun: 2000), registry: registry)
        defer { try? vm.destroy() }
        let o = try PrivilegedScenario(cpus: 4, requests: 8, seed: 11, pauseNanos: 300_000).run(on: vm)
        let t0 = o.records.map(\.raisedAt).min() ?? 0
        var t = Table(["#", "vCPU", "requested at", "entered at", "left at", "others stopped for", "handler count"])
        for (k, r) in o.records.enumerated() {
            t.add(["\(k + 1)", "\(r.cpu)", micros(r.raisedAt - t0), micros(r.enteredAt - t0), micros(r.leftAt - t0),
                   micros(r.othersStopped), k < o.handlerCounts.count ? "\(o.handlerCounts.sorted()[k])" : ""])
        }
        print(t.render())
        print("Entries \(o.stats.entries) of \(o.stats.requests) requests, failures \(o.stats.failures); reads of the region from outside the mode: \(o.probesBlocked) blocked, \(o.leaks) succeeded")
        print("Heartbeats that moved while the region was visible: \(o.movedWhileVisible); instructions run outside the mode while it was visible: \(o.outsideWhileVisible)")
    }
}

func micros(_ ns: UInt64) -> String { fmt(Double(ns) / 1000, 1) + " us" }

func mbecExits(_ s: VMStatistics) -> UInt64 { s.exitsEscalation + s.exitsReturnToUser + s.exitsEPTViolation }

func runScenario(registry: BackendRegistry, backend: String? = nil, mode: VMConfig.MBECMode, syscalls: Int,
                 smep: Bool = true) throws -> (HVCIScenario.Outcome, VMStatistics) {
    let vm = try NPTKitRuntime.makeVM(config: VMConfig(ramSize: HVCIScenario.ram, mbecMode: mode, backendName: backend),
                                registry: registry)
    defer { try? NPTKitRuntime.destroyVM(vm) }
    let o = try HVCIScenario(syscalls: syscalls, smep: smep).run(on: vm)
    return (o, vm.statistics())
}

func policyText(_ q: ViolationQualification) -> String {
    var s = ""
    s += q.contains(.readable) ? "R" : "-"
    s += q.contains(.writable) ? "W" : "-"
    s += q.contains(.executable) ? "Xs" : "--"
    s += q.contains(.userExecutable) ? "Xu" : "--"
    return s
}

func qualText(_ q: ViolationQualification) -> String {
    q.contains(.userLinear) ? "(user-mode address)" : "(supervisor-mode address)"
}

func fmt(_ d: Double, _ digits: Int = 2) -> String {
    var m = 1.0
    for _ in 0..<digits { m *= 10 }
    let r = (d * m).rounded() / m
    var s = String(r)
    if let dot = s.firstIndex(of: ".") {
        let decimals = s.distance(from: dot, to: s.endIndex) - 1
        if decimals < digits { s += String(repeating: "0", count: digits - decimals) }
    }
    return s
}

/// A plain text table.
struct Table {
    var header: [String]
    var rows: [[String]] = []
    init(_ h: [String]) { header = h }
    mutating func add(_ r: [String]) { rows.append(r) }
    func render() -> String {
        var w = header.map(\.count)
        for r in rows { for (i, c) in r.enumerated() where i < w.count { w[i] = max(w[i], c.count) } }
        func line(_ r: [String]) -> String {
            r.enumerated().map { i, c in i == r.count - 1 ? c : c + String(repeating: " ", count: w[i] - c.count) }
                .joined(separator: "  ")
        }
        var out = [line(header), w.map { String(repeating: "-", count: $0) }.joined(separator: "  ")]
        out += rows.map(line)
        return out.map { "  " + $0 }.joined(separator: "\n")
    }
}
