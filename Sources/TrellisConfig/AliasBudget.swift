import CYaml

/// Refuses a YAML document whose aliases would expand it beyond what any configuration needs
/// ("billion laughs": ten aliases of ten aliases of … of a list), before anything composes, walks,
/// compares or hashes it. Composing such a document is cheap (an alias shares its anchor's node),
/// but every later walk visits each alias again — a 10-level bomb used as a mapping key made the
/// YAML library's own duplicate-key check spin forever.
///
/// One pass over libyaml's events, linear in the file: each anchored node's expanded size is
/// recorded when it ends, an alias adds its anchor's size, and the pass stops as soon as the
/// document would exceed `maxNodes` or nest deeper than `maxDepth`.
enum AliasBudget {
    static let maxNodes = 1_000_000
    static let maxDepth = 256

    enum Outcome: Equatable {
        case fits
        /// The expanded document would hold more than `maxNodes` nodes.
        case tooLarge(line: Int)
        /// Collections nest deeper than `maxDepth`.
        case tooDeep(line: Int)
        /// libyaml could not parse it (the composer reports why, with its position).
        case unparsable
    }

    static func check(_ yaml: String, maxNodes: Int = maxNodes, maxDepth: Int = maxDepth) -> Outcome {
        var bytes = Array(yaml.utf8)
        return bytes.withUnsafeMutableBufferPointer { buffer in
            var parser = yaml_parser_t()
            guard yaml_parser_initialize(&parser) == 1 else { return .unparsable }
            defer { yaml_parser_delete(&parser) }
            yaml_parser_set_input_string(&parser, buffer.baseAddress, buffer.count)
            var anchors: [String: Int] = [:]
            // Open collections: the nodes counted inside each so far, and its anchor.
            var open: [(count: Int, anchor: String?)] = []
            var total = 0
            func add(_ n: Int) {
                total += n
                if !open.isEmpty { open[open.count - 1].count += n }
            }
            while true {
                var event = yaml_event_t()
                guard yaml_parser_parse(&parser, &event) == 1 else { return .unparsable }
                defer { yaml_event_delete(&event) }
                let line = Int(event.start_mark.line) + 1
                switch event.type {
                case YAML_STREAM_END_EVENT:
                    return .fits
                case YAML_SCALAR_EVENT:
                    add(1)
                    if let anchor = event.data.scalar.anchor { anchors[String(cString: anchor)] = 1 }
                case YAML_SEQUENCE_START_EVENT, YAML_MAPPING_START_EVENT:
                    let raw =
                        event.type == YAML_SEQUENCE_START_EVENT
                        ? event.data.sequence_start.anchor : event.data.mapping_start.anchor
                    open.append((1, raw.map { String(cString: $0) }))
                    total += 1
                    if open.count > maxDepth { return .tooDeep(line: line) }
                case YAML_SEQUENCE_END_EVENT, YAML_MAPPING_END_EVENT:
                    guard let closed = open.popLast() else { return .unparsable }
                    if let anchor = closed.anchor { anchors[anchor] = closed.count }
                    if !open.isEmpty { open[open.count - 1].count += closed.count }
                case YAML_ALIAS_EVENT:
                    // An undefined alias is the composer's to report.
                    let size = event.data.alias.anchor.flatMap { anchors[String(cString: $0)] } ?? 1
                    add(size)
                default:
                    break
                }
                if total > maxNodes { return .tooLarge(line: line) }
            }
        }
    }
}
