import NPTCore
import NPTSimulator

/// Swift entry points for tools linked with this module (the CLI): the same registry setup and
/// plugin loading that the C ABI uses.
public enum NPTKitRuntime {
    /// A registry with the built-in simulator as the default backend.
    public static func makeRegistry() -> BackendRegistry {
        let r = BackendRegistry()
        try! r.register(SimulatorBackend(), makeDefault: true)
        return r
    }

    /// Loads a backend plugin (.so) into `registry`; returns the backend's name.
    @discardableResult
    public static func loadPlugin(_ path: String, into registry: BackendRegistry) throws(NPTError) -> String {
        let b = try PluginLoader.load(path)
        try registry.register(b)
        return b.name
    }
}
