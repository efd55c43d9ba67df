/// Errors of the core. Each maps to one `npt_status` of the C ABI; `message` is the detail that
/// `npt_last_error()` returns (which argument, which range).
package struct NPTError: Error, Equatable, Sendable, CustomStringConvertible {
    package enum Code: Int32, Sendable {
        case invalidArgument = -1
        case badHandle = -2
        case misaligned = -3
        case overlap = -4
        case outOfRange = -5
        case notFound = -6
        case unsupported = -7
        case abiMismatch = -8
        case plugin = -9
        case busy = -10
        case exists = -11
        case backend = -12
        case bufferTooSmall = -13
        case state = -14
        /// The backend cannot give the guarantee the requested mode promises; the message names
        /// the missing capability (and the weaker mode a VMM may opt in to).
        case guarantee = -15
    }
    package var code: Code
    package var message: String
    package init(_ code: Code, _ message: String) { self.code = code; self.message = message }
    package var description: String { "\(code): \(message)" }

    package static func invalid(_ m: String) -> NPTError { NPTError(.invalidArgument, m) }
    package static func unsupported(_ m: String) -> NPTError { NPTError(.unsupported, m) }
}
