public import NIOHTTP1

/// An error the proxy answers a request with. Its `token` is the same short word in the response
/// body, the `x-trellis-error` header, the access log and the `token` metric label.
public struct ProxyError: Error, Hashable, Sendable, CustomStringConvertible {
    private enum Code: String, CaseIterable {
        case noRoute = "no_route"
        case noHealthyUpstream = "no_healthy_upstream"
        case upstreamConnectFailure = "upstream_connect_failure"
        case upstreamReset = "upstream_reset"
        case upstreamProtocolError = "upstream_protocol_error"
        case timeout
        case badRequest = "bad_request"
        case headerTooLarge = "header_too_large"
        case requestTimeout = "request_timeout"
        case clientDisconnect = "client_disconnect"
        case overflow
        case rateLimited = "rate_limited"
        case faultAbort = "fault_abort"
    }

    private let code: Code
    public let status: HTTPResponseStatus
    /// Where it was raised, for logs (never sent to the client).
    public let detail: String
    /// Seconds the client should wait before trying again (`Retry-After`), for `rate_limited`.
    public let retryAfter: Int?

    private init(_ code: Code, _ status: HTTPResponseStatus, _ detail: String, retryAfter: Int? = nil) {
        self.code = code
        self.status = status
        self.detail = detail
        self.retryAfter = retryAfter
    }

    public var token: String { code.rawValue }
    public var description: String { detail.isEmpty ? token : "\(token): \(detail)" }

    /// Every token the proxy can emit, for pre-creating metrics with a bounded label set.
    public static let allTokens: [String] = Code.allCases.map(\.rawValue)

    public static func == (lhs: Self, rhs: Self) -> Bool { lhs.code == rhs.code }
    public func hash(into hasher: inout Hasher) { hasher.combine(code) }

    /// No virtual host or route matched the request (404).
    public static func noRoute(_ detail: String = "") -> Self { .init(.noRoute, .notFound, detail) }
    /// The cluster has no endpoint that may take a request (503).
    public static func noHealthyUpstream(_ detail: String = "") -> Self {
        .init(.noHealthyUpstream, .serviceUnavailable, detail)
    }
    /// Connecting to the upstream was refused, reset or timed out (503).
    public static func upstreamConnectFailure(_ detail: String = "") -> Self {
        .init(.upstreamConnectFailure, .serviceUnavailable, detail)
    }
    /// The upstream closed or reset the connection before sending a response head (503).
    public static func upstreamReset(_ detail: String = "") -> Self {
        .init(.upstreamReset, .serviceUnavailable, detail)
    }
    /// The upstream sent something that is not HTTP/1.1 (502).
    public static func upstreamProtocolError(_ detail: String = "") -> Self {
        .init(.upstreamProtocolError, .badGateway, detail)
    }
    /// The route's request timeout expired before the response began (504).
    public static func timeout(_ detail: String = "") -> Self { .init(.timeout, .gatewayTimeout, detail) }
    /// The request could not be parsed, or its framing is ambiguous (400).
    public static func badRequest(_ detail: String = "") -> Self { .init(.badRequest, .badRequest, detail) }
    /// The request head exceeds the listener's limit (431).
    public static func headerTooLarge(_ detail: String = "") -> Self {
        .init(.headerTooLarge, .init(statusCode: 431, reasonPhrase: "Request Header Fields Too Large"), detail)
    }
    /// The client started a request but did not finish its head in time (408).
    public static func requestTimeout(_ detail: String = "") -> Self {
        .init(.requestTimeout, .requestTimeout, detail)
    }
    /// The client went away before the response was complete (logged as 499; nothing is sent).
    public static func clientDisconnect(_ detail: String = "") -> Self {
        .init(.clientDisconnect, .init(statusCode: 499, reasonPhrase: "Client Closed Request"), detail)
    }
    /// A circuit breaker limit was reached (503).
    public static func overflow(_ detail: String = "") -> Self { .init(.overflow, .serviceUnavailable, detail) }
    /// The route's fault injection aborted the request, with the status it names.
    public static func faultAbort(status: Int, _ detail: String = "") -> Self {
        .init(.faultAbort, HTTPResponseStatus(statusCode: status), detail)
    }
    /// What the error says about the endpoint the request went to (outlier detection): `true`
    /// when the endpoint failed (refused, reset, spoke garbage, did not answer in time), `nil` when
    /// it says nothing (a decision of the proxy itself, the client leaving).
    public var endpointFailed: Bool? {
        switch code {
        case .upstreamConnectFailure, .upstreamReset, .upstreamProtocolError, .timeout: true
        default: nil
        }
    }

    /// The gRPC status a gRPC caller gets for this error (with the token as `grpc-message`):
    /// UNIMPLEMENTED for no route, UNAVAILABLE when no upstream could answer, DEADLINE_EXCEEDED
    /// for timeouts, RESOURCE_EXHAUSTED for rate limits and oversized headers, INTERNAL for
    /// protocol errors; an injected abort maps its HTTP status as gRPC's HTTP mapping does.
    public var grpcStatus: Int {
        switch code {
        case .noRoute: 12
        case .noHealthyUpstream, .upstreamConnectFailure, .upstreamReset, .overflow: 14
        case .upstreamProtocolError, .badRequest: 13
        case .timeout, .requestTimeout: 4
        case .headerTooLarge, .rateLimited: 8
        case .clientDisconnect: 1
        case .faultAbort: Self.grpcStatus(httpStatus: Int(status.code))
        }
    }

    /// gRPC's mapping of an HTTP status (doc/http-grpc-status-mapping.md).
    static func grpcStatus(httpStatus: Int) -> Int {
        switch httpStatus {
        case 400: 13
        case 401: 16
        case 403: 7
        case 404: 12
        case 429, 502, 503, 504: 14
        default: 2
        }
    }

    /// A rate limit was reached (429); `retryAfter` seconds until the limit lets a request in.
    public static func rateLimited(_ detail: String = "", retryAfter: Int = 1) -> Self {
        .init(.rateLimited, .tooManyRequests, detail, retryAfter: retryAfter)
    }
}
