package snapmap.localstack.mongo;

import java.util.ArrayList;
import java.util.Collection;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.function.BiPredicate;

import de.bwaldvogel.mongo.bson.Document;

/**
 * Matching of long {@code $in} lists of strings or whole numbers by one hash lookup per
 * document.
 *
 * <p>The library's matcher compares a document's value with each listed value in turn, so
 * reading n documents by an {@code $in} of their n ids costs n * n comparisons: on the
 * 2-core machine 1,000 ids took 0.13 s and 5,000 ids 6 s. The pipeline reads photos, events
 * and queued links by lists of up to 5,000 ids, and its neighbourhood queries hold
 * {@code $or} branches with {@code $in} lists of cells.
 *
 * <p>A top-level field (no dot) whose condition is exactly {@code {$in: [...]}} of at least
 * {@link #MIN_LIST} values, all strings or all 32/64-bit integers, is tested by a hash set; so
 * are such fields inside the clauses of a top-level {@code $or}. The rest of the query is
 * matched by the library. A document whose value for such a field is anything else than a
 * string or a 32/64-bit integer (missing, null, an array, a double, a sub-document...) is
 * matched by the library on the whole query, so every answer is the library's: a string equals
 * only the same string, and integers of either width equal when their values do (a double is
 * never hashed, since the library compares it with integers by value).
 */
final class InLists {

    static final int MIN_LIST = 16;

    /** The query last compiled on this thread: a query is matched on many documents in turn. */
    private static final ThreadLocal<Compiled> LAST = new ThreadLocal<>();

    private InLists() {
    }

    static boolean matches(Document document, Document query,
                           BiPredicate<Document, Document> library) {
        Compiled compiled = LAST.get();
        if (compiled == null || compiled.query != query) {
            compiled = compile(query);
            LAST.set(compiled);
        }
        return compiled.matches(document, library);
    }

    private static Compiled compile(Document query) {
        Map<String, Set<Object>> sets = new LinkedHashMap<>();
        List<Compiled> anyOf = null;
        Document rest = new Document();
        for (Map.Entry<String, Object> entry : query.entrySet()) {
            String key = entry.getKey();
            Set<Object> set = key.startsWith("$") || key.contains(".")
                ? null : hashedIn(entry.getValue());
            if (set != null) {
                sets.put(key, set);
                continue;
            }
            if (key.equals("$or") && anyOf == null) {
                List<Compiled> clauses = compiledClauses(entry.getValue());
                if (clauses != null) {
                    anyOf = clauses;
                    continue;
                }
            }
            rest.put(key, entry.getValue());
        }
        return new Compiled(query, sets, anyOf, rest);
    }

    /** The clauses of a non-empty {@code $or} list, when at least one of them hashes. */
    private static List<Compiled> compiledClauses(Object value) {
        if (!(value instanceof List<?> clauses) || clauses.isEmpty()) {
            return null;
        }
        List<Compiled> compiled = new ArrayList<>();
        boolean hashes = false;
        for (Object clause : clauses) {
            if (!(clause instanceof Document)) {
                return null;
            }
            Compiled one = compile((Document) clause);
            hashes |= one.hashes();
            compiled.add(one);
        }
        return hashes ? compiled : null;
    }

    /** The set of an {@code {$in: [...]}} condition that can be hashed, else null. */
    private static Set<Object> hashedIn(Object condition) {
        if (!(condition instanceof Document in) || in.size() != 1
            || !(in.get("$in") instanceof Collection<?> values) || values.size() < MIN_LIST) {
            return null;
        }
        Set<Object> set = new HashSet<>();
        Class<?> kind = null;
        for (Object value : values) {
            Object key = hashKey(value);
            Class<?> valueKind = key == null ? null : key.getClass();
            if (valueKind == null || (kind != null && kind != valueKind)) {
                return null;
            }
            kind = valueKind;
            set.add(key);
        }
        return set;
    }

    /** A string as itself, a 32/64-bit integer as a Long; anything else null. */
    private static Object hashKey(Object value) {
        if (value instanceof String) {
            return value;
        }
        if (value instanceof Integer || value instanceof Long) {
            return ((Number) value).longValue();
        }
        return null;
    }

    private record Compiled(Document query, Map<String, Set<Object>> sets, List<Compiled> anyOf,
                            Document rest) {

        boolean hashes() {
            return !sets.isEmpty() || anyOf != null;
        }

        boolean matches(Document document, BiPredicate<Document, Document> library) {
            if (!hashes()) {
                return library.test(document, query);
            }
            for (Map.Entry<String, Set<Object>> entry : sets.entrySet()) {
                Object key = hashKey(document.get(entry.getKey()));
                if (key == null) {
                    return library.test(document, query);
                }
                if (!entry.getValue().contains(key)) {
                    return false;
                }
            }
            if (anyOf != null && anyOf.stream().noneMatch(c -> c.matches(document, library))) {
                return false;
            }
            return rest.isEmpty() || library.test(document, rest);
        }
    }
}
