import ArgumentParser
import NPTCore
import NPTKit
import NPTScenarios
import NPTSimulator
import NPTTrace
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

@main
struct NPTKitCLI: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nptkit",
        abstract: "Memory-virtualization controls hypervisors need and hardware does not always give.",
        subcommands: [Demo.self, Backends.self, Bench.self, Nfit.self, HostPMem.self, WhatIf.self, TraceDump.self, ReplayCalls.self],
        defaultSubcommand: Demo.self)
}

struct BackendOptions: ParsableArguments {
    @Option(help: "Backend to run on (see `backends`).")
    var backend: String = "sim"
    @Option(help: "Backend plugin (.so) to load first; repeatable.")
    var plugin: [String] = []
    @Option(name: .customLong("backend-opt"), help: ArgumentHelp("An argument for the plugins this command loads (KEY=VALUE; repeatable), e.g. pmem-dir=/dev/shm for kvm.", valueName: "key=value"))
    var backendOpt: [String] = []
    @Option(help: ArgumentHelp("The trace the replay backend replays (--backend replay; the plugin argument trace=FILE).", valueName: "file"))
    var trace: String?
    @Option(help: ArgumentHelp("Record every call between the core and the backend of every VM of this run to an NPTKit trace (the core's recording layer; any backend).", valueName: "file"))
    var record: String?

    func pluginArguments() throws -> [PluginArgument] {
        var args = try backendOpt.map { text in
            guard let a = PluginArgument(parsing: text) else { throw ValidationError("--backend-opt '\(text)' is not KEY=VALUE") }
            return a
        }
        if let trace {
            guard backend == "replay" else { throw ValidationError("--trace is for --backend replay") }
            args.append(PluginArgument(key: "trace", value: trace))
        }
        return args
    }

    /// The recorder of this run (--record), made once; `finishRecording` ends the trace.
    func recorder() throws -> TraceRecorder? {
        guard let record else { return nil }
        return try runRecorder.withLock { r in
            if let r { return r }
            let made = try TraceRecorder(path: record)
            r = made
            return made
        }
    }

    /// The plugin argument by which the CLI asks a plugin backend for the kind of host
    /// persistent-memory region it offers (`pmem-needs-flush=0|1`; the kvm plugin takes it, and a
    /// plugin that does not refuses it at load).
    static let pmemNeedsFlushKey = "pmem-needs-flush"

    /// A registry with the built-in simulator and the plugins asked for (or the one named by
    /// --backend, found beside this binary). `hostPMemNeedsFlush`: the kind of host
    /// persistent-memory region each backend is to offer (the simulator's platform; a plugin's
    /// argument `pmem-needs-flush`, replacing one given with --backend-opt; not for a replay, whose
    /// regions are the recorded ones), nil for each one's default.
    func registry(hostPMemNeedsFlush: Bool? = nil) throws -> BackendRegistry {
        let r = BackendRegistry()
        try r.register(SimulatorBackend(platform: .standard(needsWPQFlush: hostPMemNeedsFlush ?? true)), makeDefault: true)
        var args = try pluginArguments()
        // A replayed run (--trace) offers the host regions its recording had: the trace, not this
        // argument, says which kind each recorded VM saw.
        if let needs = hostPMemNeedsFlush, trace == nil {
            args.removeAll { $0.key == Self.pmemNeedsFlushKey }
            args.append(PluginArgument(key: Self.pmemNeedsFlushKey, value: needs ? "1" : "0"))
        }
        for p in plugin { try NPTKitRuntime.loadPlugin(p, arguments: args, into: r) }
        // The backend plugins built beside this binary are found without --plugin.
        if !r.all.contains(where: { $0.name == backend }), let dir = executableDirectory() {
            let path = dir + "/libnptkit-\(backend).so"
            if access(path, R_OK) == 0 { try NPTKitRuntime.loadPlugin(path, arguments: args, into: r) }
        }
        if !backendOpt.isEmpty, !r.all.contains(where: { $0.name == backend && $0.isPlugin }) {
            throw ValidationError("--backend-opt is for a plugin backend; '\(backend)' is built in")
        }
        guard r.all.contains(where: { $0.name == backend }) else {
            throw ValidationError("no backend '\(backend)' (registered: \(r.all.map(\.name).joined(separator: ", "))): libnptkit-\(backend).so is not beside this binary (`swift build` builds every product), or load one with --plugin PATH")
        }
        return r
    }

    /// The backend asked for, in `registry`, its VMs made as `npt_vm_create` makes them (with a
    /// handle: plugins reach the core by it).
    func host(_ registry: BackendRegistry, backend name: String? = nil) throws -> ScenarioHost {
        let recorder = try recorder()
        return try ScenarioHost(registry: registry, backendName: name ?? backend,
                         makeVM: { c, r throws(NPTError) in
                             var c = c
                             c.recorder = recorder
                             return try NPTKitRuntime.makeVM(config: c, registry: r)
                         },
                         destroyVM: { vm throws(NPTError) in try NPTKitRuntime.destroyVM(vm) })
    }
}

/// The run's recorder (BackendOptions.recorder).
let runRecorder = Mutex<TraceRecorder?>(nil)

/// Ends the run's trace (the end record, fsync), if it records.
func finishRecording() throws {
    if let r = runRecorder.withLock({ $0 }) { try r.finish() }
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

func micros(_ ns: UInt64) -> String { fmt(Double(ns) / 1000, 1) + " us" }

func mbecExits(_ s: VMStatistics) -> UInt64 { s.exitsEscalation + s.exitsReturnToUser + s.exitsEPTViolation }

func policyText(_ q: ViolationQualification) -> String {
    var s = ""
    s += q.contains(.readable) ? "R" : "-"
    s += q.contains(.writable) ? "W" : "-"
    s += q.contains(.executable) ? "Xs" : "--"
    s += q.contains(.userExecutable) ? "Xu" : "--"
    return s
}

/// The linear address's kind, where the qualification carries it.
func qualText(_ q: ViolationQualification) -> String {
    guard q.contains(.linearValid) else { return "" }
    return q.contains(.userLinear) ? " (user-mode address)" : " (supervisor-mode address)"
}


/// `text` broken into lines of at most `width` characters at spaces.
func wrapped(_ text: String, width: Int = 116) -> String {
    var lines: [String] = [], line = ""
    for word in text.split(separator: " ") {
        if !line.isEmpty && line.count + 1 + word.count > width { lines.append(line); line = "" }
        line += (line.isEmpty ? "" : " ") + word
    }
    return (lines + [line]).joined(separator: "\n")
}

/// `d` with `digits` decimals (the one formatter, NPTTrace's).
func fmt(_ d: Double, _ digits: Int = 2) -> String { NPTTrace.fmt(d, digits) }

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
