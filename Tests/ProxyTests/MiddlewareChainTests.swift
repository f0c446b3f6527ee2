import Atomics
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
import TrellisPolicy

@testable import Proxy

/// A middleware of the user's own after the standard chain: it sees every request and every
/// request's end, also when it leaves `observesCompletion` as it is; the standard middleware
/// without an `onComplete` are not called when requests end.
@Suite struct MiddlewareChainTests {
    let group = MultiThreadedEventLoopGroup.singleton

    /// Counts the requests it saw start and end.
    final class Counting: ProxyMiddleware {
        let started: ManagedAtomic<Int>
        let ended: ManagedAtomic<Int>

        init(started: ManagedAtomic<Int>, ended: ManagedAtomic<Int>) {
            self.started = started
            self.ended = ended
        }

        func onRequest(_ request: RequestContext) -> ProxyError? {
            started.wrappingIncrement(ordering: .relaxed)
            return nil
        }

        func onComplete(_ request: RequestContext) {
            ended.wrappingIncrement(ordering: .relaxed)
        }

        struct Factory: ProxyMiddlewareFactory {
            let started = ManagedAtomic(0)
            let ended = ManagedAtomic(0)
            func makeMiddleware(_ snapshot: ProxySnapshot, _ loop: LoopResources) -> any ProxyMiddleware {
                Counting(started: started, ended: ended)
            }
        }
    }

    @Test func aMiddlewareOfOnesOwnSeesEveryRequestEnd() async throws {
        let upstream = try await TestUpstream.start(name: "alpha", group: group)
        let counting = Counting.Factory()
        let api = VirtualHost(
            name: "api",
            domains: ["api.example.com"],
            routes: [Route(name: "all", match: RouteMatch(), action: RouteAction(clusters: [.init(name: "alpha")]))]
        )
        let proxy = try await ProxyHarness.start(
            gatewayConfig(
                virtualHosts: [api],
                clusters: [ClusterConfig(name: "alpha", endpoints: [endpoint(upstream)])]
            ),
            group: group,
            middleware: StandardMiddleware.chain + [counting]
        )
        for _ in 0..<20 {
            let response = try await TestHTTPClient.get(port: proxy.port, "/", host: "api.example.com", group: group)
            #expect(response.status == .ok)
        }
        // A request the standard chain refuses (no route: routing stops the chain before this
        // middleware) still ends, and is observed ending.
        let refused = try await TestHTTPClient.get(port: proxy.port, "/", host: "other.example.com", group: group)
        #expect(refused.status == .notFound)
        await proxy.stop()
        await upstream.stop()
        #expect(counting.started.load(ordering: .relaxed) == 20)
        #expect(counting.ended.load(ordering: .relaxed) == 21)
    }

    /// Of the standard chain, only the circuit breaker and load balancing act when a request
    /// ends; a middleware that does not say (the protocol's default) is always called.
    @Test func onlyMiddlewareThatObserveCompletionAreCalledAtTheEnd() throws {
        let snapshot = try ProxySnapshot(
            gatewayConfig(virtualHosts: catchAll("alpha"), clusters: [ClusterConfig(name: "alpha", endpoints: [])]),
            stats: ProxyStats()
        )
        let resources = LoopResources()
        let chain = MiddlewareChain(
            (StandardMiddleware.chain + [Counting.Factory()]).map { $0.makeMiddleware(snapshot, resources) }
        )
        #expect(chain.all.count == 6)
        let names = chain.completing.map { "\(type(of: $0))" }
        #expect(names == ["CircuitBreakerMiddleware", "LoadBalancingMiddleware", "Counting"])
        // A chain other than the standard one goes through its array; the standard one is called
        // through its types, the same observers at the end.
        #expect(!chain.isStandard)
        let standard = MiddlewareChain(StandardMiddleware.chain.map { $0.makeMiddleware(snapshot, resources) })
        #expect(standard.isStandard)
        #expect(
            standard.completing.map { "\(type(of: $0))" } == ["CircuitBreakerMiddleware", "LoadBalancingMiddleware"]
        )
    }
}
