import GRPCCore
import GRPCNIOTransportHTTP2
import SwiftProtobuf
import Synchronization
import XDS

/// A hand-driven SotW ADS client (grpc-swift-2 over real HTTP/2 on loopback): the test sends
/// requests one by one and reads what pilot answered, and how the stream ended.
final class ADSProbe: Sendable {
    private let requests: AsyncStream<Envoy_Service_Discovery_V3_DiscoveryRequest>.Continuation
    private final class State: Sendable {
        let received = Mutex<[Envoy_Service_Discovery_V3_DiscoveryResponse]>([])
        let ended = Mutex<(any Error)?>(nil)
        let finished = Mutex(false)
    }
    private let state = State()
    private let task: Task<Void, Never>

    init(port: Int) throws {
        let (stream, continuation) = AsyncStream<Envoy_Service_Discovery_V3_DiscoveryRequest>.makeStream()
        requests = continuation
        let transport = try HTTP2ClientTransport.Posix(
            target: .ipv4(address: "127.0.0.1", port: port),
            transportSecurity: .plaintext
        )
        let state = self.state
        task = Task {
            do {
                try await withGRPCClient(transport: transport) { client in
                    let ads = Envoy_Service_Discovery_V3_AggregatedDiscoveryService.Client(wrapping: client)
                    try await ads.streamAggregatedResources(
                        requestProducer: { writer in
                            for await request in stream { try await writer.write(request) }
                        },
                        onResponse: { response in
                            for try await message in response.messages {
                                state.received.withLock { $0.append(message) }
                            }
                        }
                    )
                }
            } catch {
                state.ended.withLock { $0 = error }
            }
            state.finished.withLock { $0 = true }
        }
    }

    static func request(
        node: String?,
        type: String,
        names: [String] = [],
        nonce: String = "",
        version: String = "",
        error: String? = nil,
        role: String? = nil
    ) -> Envoy_Service_Discovery_V3_DiscoveryRequest {
        var request = Envoy_Service_Discovery_V3_DiscoveryRequest()
        if let node {
            request.node.id = node
            if let role { request.node.metadata.fields["trellis.role"] = Google_Protobuf_Value(stringValue: role) }
        }
        request.typeURL = type
        request.resourceNames = names
        request.responseNonce = nonce
        request.versionInfo = version
        if let error { request.errorDetail.message = error }
        return request
    }

    func send(_ request: Envoy_Service_Discovery_V3_DiscoveryRequest) { requests.yield(request) }

    var responses: [Envoy_Service_Discovery_V3_DiscoveryResponse] { state.received.withLock { $0 } }
    var error: (any Error)? { state.ended.withLock { $0 } }
    var isFinished: Bool { state.finished.withLock { $0 } }

    func responses(of type: String) -> [Envoy_Service_Discovery_V3_DiscoveryResponse] {
        responses.filter { $0.typeURL == type }
    }

    /// ACKs the last response of `type`.
    func ack(_ type: String, node: String? = nil) {
        guard let last = responses(of: type).last else { return }
        send(Self.request(node: node, type: type, names: [], nonce: last.nonce, version: last.versionInfo))
    }

    func close() async {
        requests.finish()
        task.cancel()
        await task.value
    }
}
