import Testing
import TrellisPolicy

@testable import Proxy

/// The retry rules as pure values: which failures a policy retries, when a request may go again,
/// the budget and the back-off — no socket, no timer.
@Suite struct RetryDecisionTests {
    let fresh = RetryDecision(
        tries: 1,
        responseStarted: false,
        requestRetained: true,
        attached: false,
        idempotent: true
    )

    @Test func conditionsNameTheFailuresTheyRetry() {
        let gateway = RetryPolicy(retryOn: [.gatewayError])
        #expect(RetryDecision.wanted(gateway, after: .status(503)))
        #expect(!RetryDecision.wanted(gateway, after: .status(500)))
        #expect(RetryDecision.wanted(gateway, after: .perTryTimeout))
        #expect(!RetryDecision.wanted(gateway, after: .connectFailure))
        let server = RetryPolicy(retryOn: [.serverError])
        for failure in [TryFailure.connectFailure, .reset, .status(500), .perTryTimeout] {
            #expect(RetryDecision.wanted(server, after: failure), "5xx covers \(failure)")
        }
        #expect(!RetryDecision.wanted(server, after: .status(429)))
        let codes = RetryPolicy(retryOn: [.retriableStatusCodes], retriableStatusCodes: [409])
        #expect(RetryDecision.wanted(codes, after: .status(409)))
        #expect(!RetryDecision.wanted(codes, after: .status(503)))
        let grpc = RetryPolicy(retryOn: [.unavailable, .resourceExhausted])
        #expect(RetryDecision.wanted(grpc, after: .grpcStatus(14)))
        #expect(RetryDecision.wanted(grpc, after: .grpcStatus(8)))
        #expect(!RetryDecision.wanted(grpc, after: .grpcStatus(13)))
        #expect(!RetryDecision.wanted(grpc, after: .status(503)))
    }

    @Test func aRequestGoesAgainOnlyWhileItCan() {
        let policy = RetryPolicy(retryOn: [.serverError], numRetries: 2)
        #expect(fresh.allows(policy, after: .status(503)))
        var spent = fresh
        spent.tries = 3
        #expect(!spent.allows(policy, after: .status(503)), "two retries used")
        var started = fresh
        started.responseStarted = true
        #expect(!started.allows(policy, after: .reset), "the client already has part of an answer")
        var large = fresh
        large.requestRetained = false
        #expect(!large.allows(policy, after: .reset), "a body too large to keep cannot be sent again")
    }

    @Test func aPostThatMayHaveBeenSeenIsRetriedOnlyWithConsent() {
        var post = fresh
        post.idempotent = false
        post.attached = true
        #expect(!post.allows(RetryPolicy(retryOn: [.serverError]), after: .status(503)))
        #expect(post.allows(RetryPolicy(retryOn: [.serverError], retryNonIdempotent: true), after: .status(503)))
        // Not attached: nothing reached an upstream.
        var refused = post
        refused.attached = false
        #expect(refused.allows(RetryPolicy(retryOn: [.connectFailure]), after: .connectFailure))
        // gRPC calls are all POSTs: a gRPC status in retry_on is the consent.
        #expect(post.allows(RetryPolicy(retryOn: [.unavailable]), after: .grpcStatus(14)))
    }

    @Test func theBudgetFollowsRequestsInFlightWithinItsBounds() {
        let budget = RetryBudget(RetryPolicy(budgetPercent: 20, minRetryConcurrency: 3), maxRetries: 50)
        #expect(budget.limit(requestsInFlight: 0) == 3)
        #expect(budget.limit(requestsInFlight: 100) == 20)
        #expect(budget.limit(requestsInFlight: 10_000) == 50, "never above max_retries")
    }

    @Test func backOffDoublesUpToItsMaximum() {
        let base = Duration.milliseconds(25)
        let max = Duration.milliseconds(250)
        #expect(Backoff.ceiling(base: base, max: max, retry: 1) == .milliseconds(25))
        #expect(Backoff.ceiling(base: base, max: max, retry: 2) == .milliseconds(50))
        #expect(Backoff.ceiling(base: base, max: max, retry: 4) == .milliseconds(200))
        #expect(Backoff.ceiling(base: base, max: max, retry: 5) == .milliseconds(250))
        #expect(Backoff.ceiling(base: base, max: max, retry: 60) == .milliseconds(250))
    }
}
