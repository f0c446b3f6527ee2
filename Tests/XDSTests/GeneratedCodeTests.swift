import SwiftProtobuf
import Testing

@testable import XDS

/// The committed generated code: real xDS resources round-trip through the wire format and `Any`
/// with the type URLs Trellis uses.
@Suite struct GeneratedCodeTests {
    @Test func aClusterRoundTripsThroughAnyWithItsTypeURL() throws {
        var cluster = Envoy_Config_Cluster_V3_Cluster()
        cluster.name = "backend"
        cluster.connectTimeout = .init(seconds: 1, nanos: 500_000_000)
        cluster.lbPolicy = .leastRequest
        let packed = try Google_Protobuf_Any(message: cluster)
        #expect(packed.typeURL == TypeURL.cluster)
        let bytes: [UInt8] = try packed.serializedBytes()
        let unpacked = try Envoy_Config_Cluster_V3_Cluster(unpackingAny: Google_Protobuf_Any(serializedBytes: bytes))
        #expect(unpacked == cluster)
    }

    @Test func everyTypeURLNamesAGeneratedMessage() throws {
        #expect(
            try Google_Protobuf_Any(message: Envoy_Config_Endpoint_V3_ClusterLoadAssignment()).typeURL
                == TypeURL.clusterLoadAssignment
        )
        #expect(try Google_Protobuf_Any(message: Envoy_Config_Listener_V3_Listener()).typeURL == TypeURL.listener)
        #expect(
            try Google_Protobuf_Any(message: Envoy_Config_Route_V3_RouteConfiguration()).typeURL
                == TypeURL.routeConfiguration
        )
    }

    @Test func aDiscoveryResponseCarriesResourcesAndANonce() throws {
        var assignment = Envoy_Config_Endpoint_V3_ClusterLoadAssignment()
        assignment.clusterName = "backend"
        var endpoint = Envoy_Config_Endpoint_V3_LbEndpoint()
        endpoint.endpoint.address.socketAddress.address = "127.0.0.1"
        endpoint.endpoint.address.socketAddress.portValue = 18080
        endpoint.healthStatus = .draining
        var locality = Envoy_Config_Endpoint_V3_LocalityLbEndpoints()
        locality.lbEndpoints = [endpoint]
        assignment.endpoints = [locality]
        var response = Envoy_Service_Discovery_V3_DiscoveryResponse()
        response.typeURL = TypeURL.clusterLoadAssignment
        response.versionInfo = "7"
        response.nonce = "n-1"
        response.resources = [try Google_Protobuf_Any(message: assignment)]
        let decoded = try Envoy_Service_Discovery_V3_DiscoveryResponse(
            serializedBytes: try response.serializedBytes() as [UInt8]
        )
        let back = try Envoy_Config_Endpoint_V3_ClusterLoadAssignment(unpackingAny: decoded.resources[0])
        #expect(back.endpoints[0].lbEndpoints[0].healthStatus == .draining)
        #expect(back.endpoints[0].lbEndpoints[0].endpoint.address.socketAddress.portValue == 18080)
        #expect(decoded.nonce == "n-1")
    }
}
