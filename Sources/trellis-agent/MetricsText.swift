import Prometheus

extension PrometheusCollectorRegistry {
    /// The registry in the Prometheus text format (the admin endpoint's and the control socket's
    /// `/metrics`).
    @Sendable func text() -> String {
        var buffer: [UInt8] = []
        emit(into: &buffer)
        return String(decoding: buffer, as: UTF8.self)
    }
}
