import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SwiftProtobuf
import Testing
import TrellisTestSupport
import XDS

@testable import Pilot

/// Pilot's ADS server with real gRPC clients: malformed streams are refused and counted while
/// everyone else is served; pushes reach only the nodes whose view changed, coalesced.
@Suite(.serialized)
struct ADSBadInputTests {
    static let http = #"{"service": "web", "address": "127.0.0.1", "port": 8080, "node": "vm-a"}"#

    @Test func badStreamsAreRefusedAndCountedWhileOthersAreServed() async throws {
        try await PilotHarness.run(store: try SQLiteRegistryStore()) { pilot in
            #expect(await pilot.register(Self.http) == 201)
            let good = try ADSProbe(port: pilot.xdsPort)
            good.send(ADSProbe.request(node: "vm-good", type: TypeURL.cluster))
            #expect(await Peers.eventually(within: .seconds(5)) { good.responses(of: TypeURL.cluster).count == 1 })

            // No node on the first request.
            let anonymous = try ADSProbe(port: pilot.xdsPort)
            anonymous.send(ADSProbe.request(node: nil, type: TypeURL.cluster))
            #expect(await Peers.eventually(within: .seconds(5)) { anonymous.isFinished })
            let noNode = try #require(anonymous.error as? RPCError)
            #expect(noNode.code == .invalidArgument && noNode.message.contains("node.id"))

            // A node id pilot cannot use, and an unknown role.
            let spaced = try ADSProbe(port: pilot.xdsPort)
            spaced.send(ADSProbe.request(node: "has space", type: TypeURL.cluster))
            let roleless = try ADSProbe(port: pilot.xdsPort)
            roleless.send(ADSProbe.request(node: "vm-x", type: TypeURL.cluster, role: "router"))
            #expect(await Peers.eventually(within: .seconds(5)) { spaced.isFinished && roleless.isFinished })
            #expect((spaced.error as? RPCError)?.code == .invalidArgument)
            #expect((roleless.error as? RPCError)?.message.contains("expected sidecar, gateway or proxyless") == true)

            // An unknown type is ignored; the stream goes on and is served its known types.
            let curious = try ADSProbe(port: pilot.xdsPort)
            curious.send(
                ADSProbe.request(
                    node: "vm-curious",
                    type: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
                )
            )
            curious.send(ADSProbe.request(node: nil, type: TypeURL.listener))
            #expect(await Peers.eventually(within: .seconds(5)) { curious.responses(of: TypeURL.listener).count == 1 })
            #expect(curious.responses.allSatisfy { $0.typeURL == TypeURL.listener } && !curious.isFinished)

            // A flood of names: the stream is closed.
            let flood = try ADSProbe(port: pilot.xdsPort)
            let names = (0...AggregatedDiscoveryService.maxNamesPerType).map { "cluster-\($0)" }
            flood.send(ADSProbe.request(node: "vm-flood", type: TypeURL.clusterLoadAssignment, names: names))
            #expect(await Peers.eventually(within: .seconds(10)) { flood.isFinished })
            #expect((flood.error as? RPCError)?.code == .resourceExhausted)

            // Bytes that are not a DiscoveryRequest.
            let transport = try HTTP2ClientTransport.Posix(
                target: .ipv4(address: "127.0.0.1", port: pilot.xdsPort),
                transportSecurity: .plaintext
            )
            let malformed = try await withGRPCClient(transport: transport) { client in
                try await client.bidirectionalStreaming(
                    request: StreamingClientRequest<[UInt8]>(producer: { writer in
                        try await writer.write([0xFF, 0xFF, 0xFF, 0x0F])
                    }),
                    descriptor: Envoy_Service_Discovery_V3_AggregatedDiscoveryService.Method.StreamAggregatedResources
                        .descriptor,
                    serializer: RawBytes(),
                    deserializer: RawBytes(),
                    options: .defaults,
                    onResponse: { response in
                        do {
                            for try await _ in response.messages {}
                            return RPCError.Code?.none
                        } catch let error as RPCError {
                            return error.code
                        }
                    }
                )
            }
            #expect(malformed == .invalidArgument)

            // The good stream is still served: a new instance reaches it.
            #expect(await pilot.register(Self.http.replacingOccurrences(of: "8080", with: "8081")) == 201)
            #expect(await Peers.eventually(within: .seconds(5)) { good.responses(of: TypeURL.cluster).count == 2 })
            #expect(!good.isFinished)

            #expect(await pilot.metric(#"trellis_pilot_xds_rejected_total{reason="no_node"}"#) == 1)
            #expect(await pilot.metric(#"trellis_pilot_xds_rejected_total{reason="invalid_node"}"#) == 2)
            #expect(await pilot.metric(#"trellis_pilot_xds_rejected_total{reason="unknown_type"}"#) == 1)
            #expect(await pilot.metric(#"trellis_pilot_xds_rejected_total{reason="too_many_names"}"#) == 1)
            #expect(await pilot.metric(#"trellis_pilot_xds_rejected_total{reason="malformed"}"#) == 1)
            for probe in [good, anonymous, spaced, roleless, curious, flood] { await probe.close() }
        }
    }

    @Test func aNACKIsRecordedCountedAndNotResent() async throws {
        try await PilotHarness.run(store: try SQLiteRegistryStore()) { pilot in
            #expect(await pilot.register(Self.http) == 201)
            let probe = try ADSProbe(port: pilot.xdsPort)
            probe.send(ADSProbe.request(node: "vm-nack", type: TypeURL.cluster))
            #expect(await Peers.eventually(within: .seconds(5)) { probe.responses(of: TypeURL.cluster).count == 1 })
            let first = probe.responses(of: TypeURL.cluster)[0]
            probe.send(
                ADSProbe.request(
                    node: nil,
                    type: TypeURL.cluster,
                    nonce: first.nonce,
                    version: "",
                    error: "cluster web: bad thing"
                )
            )
            #expect(
                await Peers.eventually(within: .seconds(5)) {
                    await pilot.metric(#"trellis_pilot_xds_nacks_total{type="cds"}"#) == 1
                }
            )
            let syncz = await Peers.http("GET", "\(pilot.api)/debug/syncz").body
            #expect(syncz.contains("\"last_nack\":\"cluster web: bad thing\""), "\(syncz)")
            try await Task.sleep(for: .milliseconds(300))
            #expect(probe.responses(of: TypeURL.cluster).count == 1)  // the same version is not pushed again
            // The next change is pushed; its ACK clears the NACK.
            #expect(await pilot.register(Self.http.replacingOccurrences(of: "8080", with: "8081")) == 201)
            #expect(await Peers.eventually(within: .seconds(5)) { probe.responses(of: TypeURL.cluster).count == 2 })
            probe.ack(TypeURL.cluster)
            #expect(
                await Peers.eventually(within: .seconds(5)) {
                    await !Peers.http("GET", "\(pilot.api)/debug/syncz").body.contains("last_nack")
                }
            )
            // The NACKed response never counts as acknowledged; the ACKed one is timed, once.
            #expect(await pilot.metric(#"trellis_pilot_xds_push_duration_seconds_count{type="cds"}"#) == 1)
            await probe.close()
        }
    }

    @Test func pushesReachOnlyTheNodesWhoseViewChangedAndAreCoalesced() async throws {
        try await PilotHarness.run(store: try SQLiteRegistryStore(), debounce: .milliseconds(200)) { pilot in
            let sidecar = try ADSProbe(port: pilot.xdsPort)
            let grpc = try ADSProbe(port: pilot.xdsPort)
            for type in [TypeURL.cluster, TypeURL.listener] {
                sidecar.send(ADSProbe.request(node: "vm-side", type: type))
                grpc.send(ADSProbe.request(node: "grpc-client", type: type, role: "proxyless"))
            }
            #expect(
                await Peers.eventually(within: .seconds(5)) {
                    sidecar.responses.count == 2 && grpc.responses.count == 2
                }
            )

            // Fifty HTTP instances registered as fast as the API takes them.
            for i in 0..<50 {
                await pilot.register(Self.http.replacingOccurrences(of: "127.0.0.1", with: "127.0.1.\(i + 1)"))
            }
            #expect(
                await Peers.eventually(within: .seconds(5)) {
                    guard let last = sidecar.responses(of: TypeURL.cluster).last else { return false }
                    return await last.versionInfo == pilot.server.cache.snapshot("vm-side")?[TypeURL.cluster].version
                }
            )
            try await Task.sleep(for: .milliseconds(500))
            // The sidecar's view changed (a new cluster): pushed, but far fewer times than fifty.
            let pushes = sidecar.responses(of: TypeURL.cluster).count - 1
            #expect(pushes >= 1 && pushes <= 10, "\(pushes) CDS pushes for 50 registrations")
            // The gRPC client's view (gRPC services only) did not change: nothing was pushed to it.
            #expect(grpc.responses.count == 2)
            print("50 registrations → \(pushes) CDS push(es) to the sidecar, 0 to the proxyless client")
            await sidecar.close()
            await grpc.close()
        }
    }

    /// The per-type services (the seed registers CDS, EDS, LDS and RDS on their own): a stream of
    /// clusters, and a unary fetch of endpoints; a request for another type on them is refused.
    @Test func perTypeServicesServeTheirOwnType() async throws {
        try await PilotHarness.run(store: try SQLiteRegistryStore()) { pilot in
            #expect(await pilot.register(Self.http) == 201)
            let transport = try HTTP2ClientTransport.Posix(
                target: .ipv4(address: "127.0.0.1", port: pilot.xdsPort),
                transportSecurity: .plaintext
            )
            try await withGRPCClient(transport: transport) { client in
                var request = Envoy_Service_Discovery_V3_DiscoveryRequest()
                request.node.id = "vm-per-type"
                // FetchEndpoints (unary): the named assignment.
                request.resourceNames = ["outbound|8080||web"]
                let eds = Envoy_Service_Endpoint_V3_EndpointDiscoveryService.Client(wrapping: client)
                let fetched = try await eds.fetchEndpoints(request)
                #expect(fetched.typeURL == TypeURL.clusterLoadAssignment && fetched.resources.count == 1)
                let assignment = try Envoy_Config_Endpoint_V3_ClusterLoadAssignment(unpackingAny: fetched.resources[0])
                #expect(
                    assignment.endpoints.flatMap(\.lbEndpoints).map(\.endpoint.address.socketAddress.portValue) == [
                        8080
                    ]
                )

                // StreamClusters: the type URL may be left empty; the first answer has every cluster.
                request.resourceNames = []
                let cds = Envoy_Service_Cluster_V3_ClusterDiscoveryService.Client(wrapping: client)
                let clusters = request
                let first = try await cds.streamClusters(
                    requestProducer: { writer in try await writer.write(clusters) },
                    onResponse: { response in
                        for try await message in response.messages { return message }
                        return Envoy_Service_Discovery_V3_DiscoveryResponse()
                    }
                )
                let names = try first.resources.map { try Envoy_Config_Cluster_V3_Cluster(unpackingAny: $0).name }
                #expect(first.typeURL == TypeURL.cluster && names.contains("outbound|8080||web"))

                // Another type on the CDS service is refused.
                var wrongType = request
                wrongType.typeURL = TypeURL.listener
                let wrong = wrongType
                await #expect(throws: RPCError.self) {
                    try await cds.streamClusters(
                        requestProducer: { writer in try await writer.write(wrong) },
                        onResponse: { response in
                            for try await _ in response.messages {}
                        }
                    )
                }
            }
        }
    }
}

/// Sends and receives raw bytes: a client that speaks gRPC but not protobuf.
struct RawBytes: MessageSerializer, MessageDeserializer {
    func serialize<Bytes: GRPCContiguousBytes>(_ message: [UInt8]) throws -> Bytes { Bytes(message) }
    func deserialize<Bytes: GRPCContiguousBytes>(_ bytes: Bytes) throws -> [UInt8] {
        bytes.withUnsafeBytes { Array($0) }
    }
}
