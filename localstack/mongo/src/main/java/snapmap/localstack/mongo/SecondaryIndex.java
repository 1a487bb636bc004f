package snapmap.localstack.mongo;

import java.time.Instant;
import java.util.ArrayList;
import java.util.Collection;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.NavigableMap;
import java.util.Set;
import java.util.TreeMap;

import de.bwaldvogel.mongo.MongoCollection;
import de.bwaldvogel.mongo.backend.Index;
import de.bwaldvogel.mongo.backend.IndexKey;
import de.bwaldvogel.mongo.backend.KeyValue;
import de.bwaldvogel.mongo.backend.Missing;
import de.bwaldvogel.mongo.backend.Utils;
import de.bwaldvogel.mongo.bson.BsonRegularExpression;
import de.bwaldvogel.mongo.bson.Decimal128;
import de.bwaldvogel.mongo.bson.Document;
import de.bwaldvogel.mongo.bson.ObjectId;

/**
 * A non-unique index, which mongo-java-server 1.47 accepts and lists but does not keep: it only
 * ever names the documents that may match a query, and the caller matches the whole query on
 * each of them, so an index that names too many costs time and never a wrong answer.
 *
 * <p>It answers, on its first key, a plain value, {@code $eq}, {@code $in} of plain values, and
 * {@code $gt}/{@code $gte}/{@code $lt}/{@code $lte} of one type; on a compound index, the same
 * on the second key under each first-key value found. Further keys are not used. Everything
 * else in the query is left to the matcher; a query with none of these on the first key is not
 * answered here ({@link #candidates} returns null) and is scanned as before.
 *
 * <p>Where the library's matcher and MongoDB differ, the matcher decides, because the index only
 * narrows what it is given. To stay a superset of its answers:
 * <ul>
 *   <li>Values are normalised as the matcher normalises them for equality (every number a
 *       double, -0.0 as 0.0, null and missing alike), and kept per type: numbers, strings,
 *       dates, booleans, ObjectIds, each in its natural order, which is the matcher's order
 *       within a type. The matcher compares only values of one type (all numbers being one).</li>
 *   <li>Null and missing values are kept apart and never returned for a value or a range: the
 *       matcher never matches them to a value that is not null. A query for null is scanned.</li>
 *   <li>Values of any other type (embedded documents, binary, longs beyond a double's
 *       precision) are returned for every query, as are documents with an array on an index
 *       key path: the matcher's rules for arrays are left entirely to the matcher.</li>
 *   <li>A numeric bound of 2^31 or more in size, or not finite, leaves its side of the range
 *       open: the matcher compares such numbers as truncated longs, in another order.</li>
 * </ul>
 *
 * <p>The entries live in memory only. The index's description is stored by the library with
 * the collection's other indexes, and when the server opens a store the library adds the index
 * to its collection again, which fills an empty index from every document (as it does for a
 * new index): one scan per index at start. Memory: roughly 100 bytes per document and index
 * (an estimate from the structures used, not measured).
 *
 * <p>Every method that reads or changes the entries holds this object's monitor, because the
 * library counts documents without the collection's monitor.
 */
final class SecondaryIndex extends Index<Object> {

    private static final String ID_FIELD = "_id";

    /** Numeric bounds of this size or more are left open (see the class comment). */
    private static final double EXACT_BOUND_LIMIT = 0x1p31;

    /** Index keys used for lookups: the first, and the second of a compound index. */
    private final int depth;
    private final Level root = new Level();
    /** Documents with an array on an index key path: returned for every query. */
    private final Set<Object> unkeyed = new HashSet<>();
    private long entries;

    SecondaryIndex(String name, List<IndexKey> keys, boolean sparse) {
        super(name, keys, sparse);
        this.depth = Math.min(keys.size(), 2);
    }

    /**
     * The positions ({@code _id}s) of every document that may match {@code query}, or null when
     * the query gives this index's first key nothing it can look up.
     */
    synchronized Set<Object> candidates(Document query) {
        Condition first = Condition.of(query, keys().get(0));
        if (first == null) {
            return null;
        }
        Condition second = depth > 1 ? Condition.of(query, keys().get(1)) : null;
        Set<Object> found = new HashSet<>(unkeyed);
        for (Object child : first.select(root)) {
            if (depth == 1) {
                addLeaf(found, child);
            } else {
                for (Object leaf : Condition.selectOrAll(second, (Level) child)) {
                    addLeaf(found, leaf);
                }
            }
        }
        return found;
    }

    /**
     * The positions of every document that may match {@code query}, grouped by the value of the
     * index's first key, the groups in that value's order (highest first when not
     * {@code ascending}). Within a group the order is left to the caller. Null when this order
     * could differ from a sort on the first key: the index holds documents whose first key sorts
     * among other types (arrays, unsorted types), or the query does not bound the first key to
     * one sorted type and the index holds several types, or null or missing values, or the
     * numbers it holds include one that the library's sort places otherwise than its value
     * ({@link #sortsApartFromItsValue}).
     */
    synchronized List<Object[]> groupsInOrder(Document query, boolean ascending) {
        if (!unkeyed.isEmpty() || root.otherChild != null) {
            return null;
        }
        Span span = Span.of(query, keys().get(0));
        if (span == null) {
            if (root.nullChild != null || root.sorted.size() > 1) {
                return null;
            }
            span = root.sorted.isEmpty()
                ? Span.EMPTY : new Span(root.sorted.keySet().iterator().next(), null, null);
        }
        if (span.type == Double.class && root.numbersOutOfOrder > 0) {
            return null;
        }
        NavigableMap<Object, Object> values = span.within(root.sorted.get(span.type));
        if (!ascending) {
            values = values.descendingMap();
        }
        List<Object[]> groups = new ArrayList<>(values.size());
        for (Object child : values.values()) {
            if (depth == 1 && !(child instanceof Positions)) {
                groups.add(new Object[] {child});
                continue;
            }
            Set<Object> group = new HashSet<>();
            if (depth == 1) {
                addLeaf(group, child);
            } else {
                for (Object leaf : ((Level) child).all()) {
                    addLeaf(group, leaf);
                }
            }
            groups.add(group.toArray());
        }
        return groups;
    }

    @Override
    public Object getPosition(Document document) {
        // The _id index tells the library where a document is.
        return null;
    }

    /** Never asked to answer a query the library's way; see {@link #candidates}. */
    @Override
    public boolean canHandle(Document query) {
        return false;
    }

    @Override
    public Iterable<Object> getPositions(Document query) {
        throw new UnsupportedOperationException("use candidates(query)");
    }

    /** Lets the library take a removed document's position from the _id index. */
    @Override
    protected boolean isSparse() {
        return true;
    }

    @Override
    public void checkAdd(Document document, MongoCollection<Object> collection) {
        // Refuses parallel arrays in a compound index, as MongoDB does.
        getKeyValues(document);
    }

    @Override
    public void checkUpdate(Document oldDocument, Document newDocument,
                            MongoCollection<Object> collection) {
        getKeyValues(newDocument);
    }

    @Override
    public synchronized void add(Document document, Object position,
                                 MongoCollection<Object> collection) {
        if (position == null) {
            return;
        }
        List<Object> key = keyOf(document);
        if (key == null) {
            if (unkeyed.add(position)) {
                entries++;
            }
            return;
        }
        if (depth == 1) {
            root.put(key.get(0), addToLeaf(root.get(key.get(0)), position));
            return;
        }
        Level second = (Level) root.get(key.get(0));
        if (second == null) {
            second = new Level();
            root.put(key.get(0), second);
        }
        second.put(key.get(1), addToLeaf(second.get(key.get(1)), position));
    }

    @Override
    public synchronized Object remove(Document document) {
        Object position = document.get(ID_FIELD);
        if (position != null) {
            removeEntry(keyOf(document), position);
        }
        return null;
    }

    @Override
    public synchronized void updateInPlace(Document oldDocument, Document newDocument,
                                           Object position, MongoCollection<Object> collection) {
        List<Object> oldKey = keyOf(oldDocument);
        List<Object> newKey = keyOf(newDocument);
        if (oldKey != null && oldKey.equals(newKey)) {
            return;
        }
        removeEntry(oldKey, position);
        add(newDocument, position, collection);
    }

    @Override
    public synchronized long getCount() {
        return entries;
    }

    @Override
    public long getDataSize() {
        return 0;
    }

    @Override
    public synchronized void drop() {
        root.clear();
        unkeyed.clear();
        entries = 0;
    }

    /**
     * The document's normalised values for the keys used, or null when one of the index's key
     * paths holds an array (such a document is returned for every query).
     */
    private List<Object> keyOf(Document document) {
        for (String path : keys()) {
            if (Utils.getSubdocumentValueCollectionAware(document, path) instanceof Collection) {
                return null;
            }
        }
        KeyValue keyValue = getKeyValues(document).iterator().next();
        List<Object> key = new ArrayList<>(depth);
        for (int i = 0; i < depth; i++) {
            key.add(keyValue.get(i));
        }
        return key;
    }

    private void removeEntry(List<Object> key, Object position) {
        if (key == null) {
            if (unkeyed.remove(position)) {
                entries--;
            }
            return;
        }
        if (depth == 1) {
            root.put(key.get(0), removeFromLeaf(root.get(key.get(0)), position));
            return;
        }
        Level second = (Level) root.get(key.get(0));
        if (second == null) {
            return;
        }
        second.put(key.get(1), removeFromLeaf(second.get(key.get(1)), position));
        if (second.isEmpty()) {
            root.put(key.get(0), null);
        }
    }

    /** A leaf is one position, or a {@link Positions} set when several documents share a key. */
    private Object addToLeaf(Object leaf, Object position) {
        if (leaf == null) {
            entries++;
            return position;
        }
        if (leaf instanceof Positions) {
            if (((Positions) leaf).add(position)) {
                entries++;
            }
            return leaf;
        }
        if (leaf.equals(position)) {
            return leaf;
        }
        Positions positions = new Positions();
        positions.add(leaf);
        positions.add(position);
        entries++;
        return positions;
    }

    private Object removeFromLeaf(Object leaf, Object position) {
        if (leaf instanceof Positions) {
            Positions positions = (Positions) leaf;
            if (positions.remove(position)) {
                entries--;
            }
            return positions.isEmpty() ? null : positions;
        }
        if (leaf != null && leaf.equals(position)) {
            entries--;
            return null;
        }
        return leaf;
    }

    private static void addLeaf(Set<Object> found, Object leaf) {
        if (leaf instanceof Positions) {
            found.addAll((Positions) leaf);
        } else if (leaf != null) {
            found.add(leaf);
        }
    }

    /** Several documents' positions under one key. */
    private static final class Positions extends HashSet<Object> {
        private static final long serialVersionUID = 1L;
    }

    /**
     * The entries under one key: per type a sorted map from value to child (a leaf, or the next
     * key's level), plus the children of null or missing values and of unsorted values.
     */
    private static final class Level {
        private final Map<Class<?>, TreeMap<Object, Object>> sorted = new HashMap<>();
        private Object nullChild;
        private Object otherChild;
        /** How many of the numbers kept sorted here {@link #sortsApartFromItsValue}. */
        private int numbersOutOfOrder;

        Object get(Object value) {
            if (value == null) {
                return nullChild;
            }
            Class<?> type = sortedType(value);
            if (type == null) {
                return otherChild;
            }
            TreeMap<Object, Object> values = sorted.get(type);
            return values == null ? null : values.get(value);
        }

        /** Sets the child of a value; null removes it. */
        void put(Object value, Object child) {
            if (value == null) {
                nullChild = child;
                return;
            }
            Class<?> type = sortedType(value);
            if (type == null) {
                otherChild = child;
                return;
            }
            TreeMap<Object, Object> values = sorted.computeIfAbsent(type, t -> new TreeMap<>());
            if (child == null) {
                if (values.remove(value) != null && sortsApartFromItsValue(value)) {
                    numbersOutOfOrder--;
                }
                if (values.isEmpty()) {
                    sorted.remove(type);
                }
            } else if (values.put(value, child) == null && sortsApartFromItsValue(value)) {
                numbersOutOfOrder++;
            }
        }

        boolean isEmpty() {
            return sorted.isEmpty() && nullChild == null && otherChild == null;
        }

        void clear() {
            sorted.clear();
            nullChild = null;
            otherChild = null;
            numbersOutOfOrder = 0;
        }

        List<Object> all() {
            List<Object> children = new ArrayList<>();
            for (TreeMap<Object, Object> values : sorted.values()) {
                children.addAll(values.values());
            }
            addIfPresent(children, nullChild);
            addIfPresent(children, otherChild);
            return children;
        }

        List<Object> equalTo(List<Object> values) {
            List<Object> children = new ArrayList<>();
            for (Object value : values) {
                TreeMap<Object, Object> ofType = sorted.get(sortedType(value));
                if (ofType != null) {
                    addIfPresent(children, ofType.get(value));
                }
            }
            addIfPresent(children, otherChild);
            return children;
        }

        List<Object> between(Class<?> type, Object low, Object high) {
            List<Object> children = new ArrayList<>();
            TreeMap<Object, Object> ofType = sorted.get(type);
            // An empty range (low above high) has no children of the type.
            if (ofType != null
                && (low == null || high == null || compareSameType(low, high) <= 0)) {
                NavigableMap<Object, Object> range = ofType;
                if (low != null) {
                    range = range.tailMap(low, true);
                }
                if (high != null) {
                    range = range.headMap(high, true);
                }
                children.addAll(range.values());
            }
            addIfPresent(children, otherChild);
            return children;
        }

        @SuppressWarnings({"unchecked", "rawtypes"})
        private static int compareSameType(Object a, Object b) {
            return ((Comparable) a).compareTo(b);
        }

        private static void addIfPresent(List<Object> children, Object child) {
            if (child != null) {
                children.add(child);
            }
        }
    }

    /**
     * The type under which a normalised value is kept sorted, or null for a value kept with the
     * ones returned for every query.
     */
    static Class<?> sortedType(Object value) {
        if (value instanceof Double || value instanceof String || value instanceof Instant
            || value instanceof Boolean || value instanceof ObjectId) {
            return value.getClass();
        }
        return null;
    }

    /**
     * Whether the library's sort can place this normalised value otherwise than a double's
     * order would: it compares two numbers as longs, each truncated (NaN as 0, infinities and
     * values beyond a long's range as its ends), when either is a whole number of 2^31 or more
     * in size. So NaN, infinities, and values of 2^31 or more in size that are not whole or
     * are 2^63 or more can tie with such a number or sort on its other side.
     */
    static boolean sortsApartFromItsValue(Object value) {
        if (!(value instanceof Double)) {
            return false;
        }
        double number = (Double) value;
        if (Double.isNaN(number) || Double.isInfinite(number)) {
            return true;
        }
        double size = Math.abs(number);
        return size >= EXACT_BOUND_LIMIT && (size >= 0x1p63 || number != Math.rint(number));
    }

    /**
     * Whether the library's sort may compare one of the document's values at these paths
     * inconsistently (a before b before c, yet c before a; or a equal to b and to c, yet b
     * before c): a number that {@link #sortsApartFromItsValue}, or a Decimal128, which it
     * compares exactly with another Decimal128 but as a double with other numbers. Arrays and
     * embedded documents are looked into, since the sort compares their elements.
     */
    static boolean sortsInconsistently(Document document, Collection<String> paths) {
        for (String path : paths) {
            if (sortsInconsistently(Utils.getSubdocumentValueCollectionAware(document, path))) {
                return true;
            }
        }
        return false;
    }

    private static boolean sortsInconsistently(Object value) {
        if (value instanceof Decimal128) {
            return true;
        }
        if (value instanceof Number) {
            return sortsApartFromItsValue(((Number) value).doubleValue());
        }
        if (value instanceof Collection<?>) {
            return ((Collection<?>) value).stream().anyMatch(SecondaryIndex::sortsInconsistently);
        }
        if (value instanceof Document) {
            return ((Document) value).values().stream()
                .anyMatch(SecondaryIndex::sortsInconsistently);
        }
        return false;
    }

    /**
     * A query value as the matcher normalises it for equality, or null for one this index does
     * not look up (null, missing, arrays, documents, regular expressions, other types).
     */
    static Object lookupValue(Object value) {
        if (Missing.isNullOrMissing(value) || BsonRegularExpression.isRegularExpression(value)) {
            return null;
        }
        Object normalised = value;
        if (value instanceof Number) {
            double number = ((Number) value).doubleValue();
            if (value instanceof Long && (long) number != (Long) value) {
                return null;
            }
            normalised = number == -0.0 ? 0.0 : number;
        }
        return sortedType(normalised) == null ? null : normalised;
    }

    /**
     * The values one key can have in a document that matches a query: values of one sorted type
     * between inclusive bounds (null: open), or none at all ({@link #EMPTY}). Built from the
     * key's own condition, the clauses of {@code $and} (all must hold) and of {@code $or} (one
     * must); a part of the query it cannot read only leaves the span wider.
     */
    private static final class Span {
        static final Span EMPTY = new Span(null, null, null);

        /** Null for {@link #EMPTY}. */
        final Class<?> type;
        final Object low;
        final Object high;

        Span(Class<?> type, Object low, Object high) {
            this.type = type;
            this.low = low;
            this.high = high;
        }

        /** The span of {@code path} in documents matching {@code query}, or null when unbounded. */
        static Span of(Document query, String path) {
            Span span = of(Condition.of(query, path));
            if (query.get("$and") instanceof List<?>) {
                for (Object clause : (List<?>) query.get("$and")) {
                    if (clause instanceof Document) {
                        span = intersect(span, of((Document) clause, path));
                    }
                }
            }
            if (query.get("$or") instanceof List<?> && !((List<?>) query.get("$or")).isEmpty()) {
                Span hull = EMPTY;
                for (Object clause : (List<?>) query.get("$or")) {
                    hull = clause instanceof Document
                        ? union(hull, of((Document) clause, path)) : null;
                    if (hull == null) {
                        break;
                    }
                }
                span = intersect(span, hull);
            }
            return span;
        }

        private static Span of(Condition condition) {
            if (condition == null) {
                return null;
            }
            if (condition.values == null) {
                return new Span(condition.type, condition.low, condition.high);
            }
            Span span = EMPTY;
            for (Object value : condition.values) {
                span = union(span, new Span(sortedType(value), value, value));
                if (span == null) {
                    return null;
                }
            }
            return span;
        }

        /** Both spans at once; when their types differ nothing matches, and either one is kept
         * (still a superset). */
        private static Span intersect(Span a, Span b) {
            if (a == null || b == EMPTY) {
                return b;
            }
            if (b == null || a == EMPTY || a.type != b.type) {
                return a;
            }
            return new Span(a.type, pick(a.low, b.low, true), pick(a.high, b.high, false));
        }

        /** Either span; null (unbounded) when their types differ. */
        private static Span union(Span a, Span b) {
            if (a == null || b == null) {
                return null;
            }
            if (a == EMPTY || b == EMPTY) {
                return a == EMPTY ? b : a;
            }
            if (a.type != b.type) {
                return null;
            }
            Object low = a.low == null || b.low == null ? null : pick(a.low, b.low, false);
            Object high = a.high == null || b.high == null ? null : pick(a.high, b.high, true);
            return new Span(a.type, low, high);
        }

        /** The larger (or smaller) of two bounds of one type, an open bound counting as absent. */
        private static Object pick(Object a, Object b, boolean larger) {
            if (a == null || b == null) {
                return a == null ? b : a;
            }
            int order = Level.compareSameType(a, b);
            return (order >= 0) == larger ? a : b;
        }

        /** The part of {@code values} (of this span's type) inside the span. */
        NavigableMap<Object, Object> within(NavigableMap<Object, Object> values) {
            if (values == null || this == EMPTY
                || (low != null && high != null && Level.compareSameType(low, high) > 0)) {
                return new TreeMap<>();
            }
            NavigableMap<Object, Object> range = values;
            if (low != null) {
                range = range.tailMap(low, true);
            }
            if (high != null) {
                range = range.headMap(high, true);
            }
            return range;
        }
    }

    /** What a query asks of one index key: a set of values, or a range of one type. */
    private static final class Condition {
        private final List<Object> values;
        private final Class<?> type;
        private final Object low;
        private final Object high;

        private Condition(List<Object> values, Class<?> type, Object low, Object high) {
            this.values = values;
            this.type = type;
            this.low = low;
            this.high = high;
        }

        /** The condition of {@code query} on {@code path}, or null when there is none to use. */
        static Condition of(Document query, String path) {
            if (!query.containsKey(path)) {
                return null;
            }
            Object condition = query.get(path);
            if (!(condition instanceof Document)) {
                Object value = lookupValue(condition);
                return value == null ? null : new Condition(List.of(value), null, null, null);
            }
            Document operators = (Document) condition;
            if (operators.isEmpty()
                || !operators.keySet().stream().allMatch(key -> key.startsWith("$"))) {
                return null;
            }
            if (operators.containsKey("$in")) {
                return ofIn(operators.get("$in"));
            }
            if (operators.containsKey("$eq")) {
                Object value = lookupValue(operators.get("$eq"));
                return value == null ? null : new Condition(List.of(value), null, null, null);
            }
            return ofRange(operators);
        }

        private static Condition ofIn(Object listed) {
            if (!(listed instanceof Collection)) {
                return null;
            }
            List<Object> values = new ArrayList<>();
            for (Object item : (Collection<?>) listed) {
                Object value = lookupValue(item);
                if (value == null) {
                    return null;
                }
                values.add(value);
            }
            return new Condition(values, null, null, null);
        }

        private static Condition ofRange(Document operators) {
            Object low = bound(operators, "$gt", "$gte");
            Object high = bound(operators, "$lt", "$lte");
            if (low == NO_BOUND || high == NO_BOUND || (low == null && high == null)) {
                return null;
            }
            Class<?> type = sortedType(low != null ? low : high);
            if (low != null && high != null && sortedType(high) != type) {
                return null;
            }
            return new Condition(null, type, openIfInexact(low), openIfInexact(high));
        }

        /** Marks a bound that cannot be looked up, which makes the whole range unusable. */
        private static final Object NO_BOUND = new Object();

        private static Object bound(Document operators, String strict, String inclusive) {
            if (operators.containsKey(strict) && operators.containsKey(inclusive)) {
                return NO_BOUND;
            }
            String operator = operators.containsKey(strict) ? strict : inclusive;
            if (!operators.containsKey(operator)) {
                return null;
            }
            Object value = lookupValue(operators.get(operator));
            return value == null ? NO_BOUND : value;
        }

        /** Strict bounds are looked up as inclusive ones (the matcher drops the equal ones). */
        private static Object openIfInexact(Object bound) {
            if (bound instanceof Double) {
                double number = (Double) bound;
                if (Double.isNaN(number) || Math.abs(number) >= EXACT_BOUND_LIMIT) {
                    return null;
                }
            }
            return bound;
        }

        List<Object> select(Level level) {
            if (values != null) {
                return level.equalTo(values);
            }
            if (low == null && high == null) {
                // Both bounds left open: every value of the type, and the unsorted ones.
                return level.between(type, null, null);
            }
            return level.between(type, low, high);
        }

        static List<Object> selectOrAll(Condition condition, Level level) {
            return condition == null ? level.all() : condition.select(level);
        }
    }
}
