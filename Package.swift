// swift-tools-version: 6.1
import PackageDescription

let strict: [SwiftSetting] = [.swiftLanguageMode(.v6)]

let package = Package(
    name: "NPTKit",
    products: [
        // libnptkit.so: the C ABI. A C program links it with -lnptkit.
        .library(name: "nptkit", type: .dynamic, targets: ["NPTKit"]),
        .executable(name: "nptkit-cli", targets: ["nptkit-cli"]),
        .executable(name: "nptkit-differential", targets: ["nptkit-differential"]),
        // libnptkit-kvm.so: the KVM backend plugin (npt_plugin_load). It talks to the core only
        // through the C ABI: it links neither libnptkit.so nor NPTCore.
        .library(name: "nptkit-kvm", type: .dynamic, targets: ["NPTKVM"]),
        // libnptkit-replay.so: the trace replay backend plugin; like the KVM plugin it reaches the
        // core only through the C ABI (it links NPTTrace, which depends on nothing of the core).
        .library(name: "nptkit-replay", type: .dynamic, targets: ["NPTReplay"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
    ],
    targets: [
        // Vends include/nptkit.h (symlinked) to Swift.
        .target(name: "CNPTKit", path: "Sources/CNPTKit"),
        // The system's libffi: `nptkit-cli replay-calls` calls the library's functions from a recorded
        // call trace through ffi_call, from the signature table generated from include/nptkit.h.
        .systemLibrary(name: "CFFI", path: "Sources/CFFI", pkgConfig: "libffi",
                       providers: [.apt(["libffi-dev"])]),
        // The trace format (writer, reader), the kernel-tracepoint text parser and the what-if model.
        // Depends on nothing of NPTKit, so the replay plugin can link it without a second core.
        // Its CPU helpers: the time stamp counter and the crc32 instruction (Swift fallbacks elsewhere).
        .target(name: "NPTTrace", dependencies: ["CNPTTraceFast"], swiftSettings: strict),
        .target(name: "CNPTTraceFast", path: "Sources/CNPTTraceFast"),
        // The core; its recording layer (Recording.swift) writes NPTKit traces.
        .target(name: "NPTCore", dependencies: ["NPTTrace"], swiftSettings: strict),
        // What the core needs from the host OS beside it: the libnvdimm sysfs discovery and threads.
        .target(name: "NPTHost", dependencies: ["NPTCore"], swiftSettings: strict),
        .target(name: "NPTSimulator", dependencies: ["NPTCore"], swiftSettings: strict),
        .target(name: "NPTKit", dependencies: ["CNPTKit", "NPTCore", "NPTHost", "NPTSimulator"], swiftSettings: strict),
        // Raw KVM loops (plain ioctls, no NPTKit code) the KVM benchmark measures the library against.
        .target(name: "CRawKVM", path: "Sources/CRawKVM"),
        // The scenarios: one driver per scenario against the VM/vCPU API, one guest image per guest
        // ISA (the simulator's built in Swift; x86-64 assembled into committed headers, CScenarioGuests).
        .target(name: "CScenarioGuests", path: "Sources/NPTScenarios/Guests",
                exclude: ["x86-64/build.sh", "x86-64/system.inc", "x86-64/gate.S", "x86-64/hello.S", "x86-64/hvci.S",
                          "x86-64/kernel.S", "x86-64/pmem.S", "x86-64/priv.S", "x86-64/smp.S"]),
        .target(name: "NPTScenarios", dependencies: ["NPTCore", "NPTHost", "NPTSimulator", "CScenarioGuests"], exclude: ["Guests"],
                swiftSettings: strict),
        // The CLI (Sources/nptkit-cli; named apart from the library's NPTKit, also on a case-insensitive disk).
        .executableTarget(
            name: "nptkit-cli",
            dependencies: ["NPTKit", "NPTCore", "NPTHost", "NPTSimulator", "NPTScenarios", "NPTTrace", "CRawKVM", "CFFI",
                           .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: strict),
        // The KVM backend plugin (Plugins/ needs explicit paths: SwiftPM reserves it for package plugins).
        .target(name: "CKVM", path: "Plugins/KVM/CKVM"),
        .target(
            name: "NPTKVM",
            dependencies: ["CNPTKit", "CKVM", .product(name: "SystemPackage", package: "swift-system")],
            path: "Plugins/KVM/Sources",
            swiftSettings: strict),
        .target(name: "NPTReplay", dependencies: ["CNPTKit", "NPTTrace"], path: "Plugins/TraceReplay/Sources",
                swiftSettings: strict),
        // Test support: a reference model of hardware MBEC written from the SDM, sharing no code
        // with the emulation (it imports nothing of NPTKit), and the differential harness that
        // runs it against the emulation (used by the tests and by `nptkit-differential --steps N`).
        .target(name: "MBECReference", path: "Tests/Support/MBECReference", swiftSettings: strict),
        // The exhaustive checker of the privileged-mode protocol (every interleaving for a few CPUs).
        .target(name: "NPTModelCheck", dependencies: ["NPTCore"], path: "Tests/Support/ModelCheck", swiftSettings: strict),
        .target(name: "NPTDifferential", dependencies: ["NPTCore", "NPTHost", "NPTSimulator", "NPTScenarios", "MBECReference"],
                path: "Tests/Support/Differential", swiftSettings: strict),
        .executableTarget(name: "nptkit-differential", dependencies: ["NPTDifferential"],
                          path: "Tests/Support/DifferentialMain", swiftSettings: strict),
        .testTarget(name: "NPTCoreTests", dependencies: ["NPTCore", "NPTScenarios", "NPTTrace"], swiftSettings: strict),
        .testTarget(name: "NPTHostTests", dependencies: ["NPTCore", "NPTHost"], swiftSettings: strict),
        .testTarget(name: "NPTSimulatorTests", dependencies: ["NPTCore", "NPTHost", "NPTSimulator", "NPTScenarios", "NPTModelCheck", "MBECReference", "NPTDifferential"],
                    swiftSettings: strict),
        .testTarget(name: "NPTTraceTests", dependencies: ["NPTTrace"], swiftSettings: strict),
        .testTarget(name: "NPTKitTests", dependencies: ["CNPTKit", "NPTCore", "NPTKit"], swiftSettings: strict),
        // The scenarios library on every backend: the simulator, and KVM through its plugin.
        .testTarget(name: "NPTScenariosTests", dependencies: ["NPTCore", "NPTHost", "NPTKit", "NPTScenarios", "NPTSimulator", "NPTTrace"], swiftSettings: strict),
    ]
)
