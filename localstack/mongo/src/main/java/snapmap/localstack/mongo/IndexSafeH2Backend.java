package snapmap.localstack.mongo;

import java.lang.reflect.Field;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashSet;
import java.util.List;
import java.util.Objects;
import java.util.Set;
import java.util.stream.Stream;

import org.h2.mvstore.MVMap;
import org.h2.mvstore.MVStore;
import org.h2.mvstore.type.DataType;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import de.bwaldvogel.mongo.MongoCollection;
import de.bwaldvogel.mongo.MongoDatabase;
import de.bwaldvogel.mongo.backend.CollectionOptions;
import de.bwaldvogel.mongo.backend.CursorRegistry;
import de.bwaldvogel.mongo.backend.Index;
import de.bwaldvogel.mongo.backend.IndexKey;
import de.bwaldvogel.mongo.backend.QueryResult;
import de.bwaldvogel.mongo.backend.Utils;
import de.bwaldvogel.mongo.backend.h2.H2Backend;
import de.bwaldvogel.mongo.backend.h2.H2Collection;
import de.bwaldvogel.mongo.backend.h2.H2Database;
import de.bwaldvogel.mongo.backend.h2.H2UniqueIndex;
import de.bwaldvogel.mongo.bson.BsonRegularExpression;
import de.bwaldvogel.mongo.bson.Document;
import de.bwaldvogel.mongo.exception.IndexBuildFailedException;
import de.bwaldvogel.mongo.exception.MongoServerError;
import io.netty.channel.Channel;

/**
 * The H2 backend with index changes serialised against writes, cheaper index key comparison,
 * collection keys compared safely from several threads, non-unique indexes that answer queries,
 * H2's automatic compaction off, and replies cut into batches as MongoDB cuts them.
 *
 * <p>mongo-java-server 1.47 guards a collection's writes and queries with the collection's
 * monitor, but not {@code addIndex} or {@code dropIndex}: a {@code createIndexes} arriving while
 * another client upserts into the same collection changes the index list under the writer's
 * iteration, and the writer fails with a {@code ConcurrentModificationException} that the
 * driver sees as "Unknown error". The pipeline creates its indexes at start while the upload
 * backend may already be writing, so here both index operations take the same monitor.
 *
 * <p>Every unique index (the {@code _id} index included) is kept in a map whose key type is
 * {@link IndexKeyType}: the library's own format and key order, without serialising both keys
 * at every comparison. The library opens the map by name with {@code MVStore.openMap(name)},
 * which returns the instance already open under that name, so opening it first with our key
 * type is enough; the check after it logs a warning should a library change undo that.
 * {@code openStore(fileName, false)} leaves the index maps to the library, as before.
 *
 * <p>A collection's documents are kept in a map keyed by {@code _id}, whose key type is
 * {@link ObjectKeyType}: the library's ObjectDataType without its race between a comparison and
 * the store's background writes (see there). Format and order are the library's in both cases.
 * Its values, the documents, are written as BSON ({@link DocumentValueType}) instead of
 * Java-serialised; documents written the library's way are still read.
 *
 * <p>Non-unique indexes are {@link SecondaryIndex}es, which name the documents that may match a
 * query; {@link Collection#queryDocuments} matches the whole query on those, in the order a scan
 * would read them. The library's own non-unique index keeps nothing.
 *
 * <p>The answers of {@code find} and {@code aggregate} are cut into batches of at most 16 MiB
 * (and a first batch of 101 documents unless the client asks otherwise) by {@link ReplyBatches},
 * the rest served through {@code getMore}: the library sent a whole answer in one reply, which
 * the driver refuses above 48 MB.
 *
 * <p>The library builds its database and collection objects inside its constructors (the
 * backend reopens every stored database while it is being constructed), before a subclass
 * field could be set; hence the store is handed over through {@link #openStore}, which must be
 * used instead of {@code MVStore.open}. One server process holds one store.
 */
final class IndexSafeH2Backend extends H2Backend {

    /** Same names as the library's own H2 maps, so that existing stores open unchanged. */
    private static final String DATA_PREFIX = "databases.";
    private static final String META_PREFIX = "meta.";
    /** The library names an index map {@code <db>.<collection>._index_<index name>}. */
    private static final String INDEX_INFIX = "._index_";

    /**
     * H2's page cache, in MB of its own estimate of page memory (its default is 16). A page that
     * is not in the cache is read from the file again, and every key and document on it
     * Java-deserialised: with 100,000 photos and the default, random reads by {@code _id} spent
     * about half of the server's time doing that. The cache grows only as pages are read.
     */
    private static final int PAGE_CACHE_MB = 128;

    /**
     * H2's automatic compaction is off (a fill rate of 0). With it on (H2's default, 90 %), the
     * store's background thread rewrites the live pages of sparsely filled chunks into new ones
     * and frees the old chunks; a long read of a map that started before such a rewrite could
     * then ask for a chunk that is gone, and the client got "Unknown error: Chunk N not found"
     * (an MVStoreException from FileStore.getChunk), as in the 100,000-photo backfill. Without
     * compaction a chunk is freed only when none of its pages is live any more. The cost: the
     * file keeps sparsely filled chunks instead of packing them, so it can grow larger; the
     * space of wholly dead chunks is still reused.
     */
    private static final int AUTO_COMPACT_FILL_RATE = 0;

    private static final Logger log = LoggerFactory.getLogger(IndexSafeH2Backend.class);

    private static MVStore store;
    private static boolean cachedIndexKeys;
    private static boolean secondaryIndexes;

    private final ReplyBatches replyBatches;

    private IndexSafeH2Backend(MVStore mvStore, long cursorTimeoutMillis, long cursorMemoryBytes) {
        super(mvStore);
        replyBatches = new ReplyBatches(getCursorRegistry(), cursorTimeoutMillis,
                                        cursorMemoryBytes);
    }

    /**
     * Opens the store and the databases in it. With {@code cachedIndexKeys} the unique indexes
     * use {@link IndexKeyType}; without, the library's own key type (same format and order).
     * With {@code secondaryIndexes} non-unique indexes are kept and used ({@link SecondaryIndex});
     * without, they are listed but do nothing, as in the library. A cursor idle for
     * {@code cursorTimeoutMillis} is closed, and the open cursors hold at most
     * {@code cursorMemoryBytes} of documents ({@link ReplyBatches}).
     */
    static synchronized IndexSafeH2Backend openStore(String fileName, boolean cachedIndexKeys,
                                                     boolean secondaryIndexes,
                                                     long cursorTimeoutMillis,
                                                     long cursorMemoryBytes) {
        if (store != null) {
            throw new IllegalStateException("this process already holds a store");
        }
        IndexSafeH2Backend.cachedIndexKeys = cachedIndexKeys;
        IndexSafeH2Backend.secondaryIndexes = secondaryIndexes;
        store = new MVStore.Builder().fileName(fileName).cacheSize(PAGE_CACHE_MB)
            .autoCompactFillRate(AUTO_COMPACT_FILL_RATE).open();
        return new IndexSafeH2Backend(store, cursorTimeoutMillis, cursorMemoryBytes);
    }

    /** The library's status, with the cursors our backend has closed for being idle. */
    @Override
    public Document getServerStatus() {
        Document status = super.getServerStatus();
        if (status.get("metrics") instanceof Document metrics
            && metrics.get("cursor") instanceof Document cursor) {
            cursor.put("timedOut", replyBatches.timedOut());
        }
        return status;
    }

    @Override
    public void close() {
        replyBatches.close();
        super.close();
    }

    /**
     * Every command, the library's answer to {@code find} and {@code aggregate} then cut into
     * batches ({@link ReplyBatches}); a {@code getMore} takes its batch from our cursor, which
     * cuts it the same way, once its namespace is checked against the cursor's.
     */
    @Override
    public Document handleCommand(Channel channel, String databaseName, String command,
                                  Document query) {
        if (databaseName.equals("admin") && command.equalsIgnoreCase("listDatabases")) {
            return listDatabases();
        }
        if (command.equalsIgnoreCase("getMore")) {
            replyBatches.checkGetMore(databaseName, query);
        }
        Document response = super.handleCommand(channel, databaseName, command, query);
        if (command.equalsIgnoreCase("find")) {
            return replyBatches.cutFirstBatch(response, query.get("batchSize"),
                Utils.isTrue(query.get("singleBatch")));
        }
        if (command.equalsIgnoreCase("aggregate") && query.get("cursor") instanceof Document) {
            Object batchSize = ((Document) query.get("cursor")).get("batchSize");
            return replyBatches.cutFirstBatch(response, batchSize, false);
        }
        return response;
    }

    /**
     * {@code listDatabases} from the databases already open. The library's answer opens every
     * database anew, which builds each of its non-unique indexes again from all its documents
     * (seconds and gigabytes at a million photos) in an object it then drops; that long read,
     * beside another client's writes, is where "Chunk N not found" was seen at a million
     * photos (2026-12-05).
     */
    private Document listDatabases() {
        List<Document> databases = new ArrayList<>();
        for (String name : listDatabaseNames().stream().sorted().toList()) {
            MongoDatabase database = resolveDatabase(name);
            Document entry = new Document("name", database.getDatabaseName());
            entry.put("empty", database.isEmpty());
            databases.add(entry);
        }
        Document response = new Document("databases", databases);
        Utils.markOkay(response);
        return response;
    }

    @Override
    protected Document handleKillCursors(Document query) {
        Document response = super.handleKillCursors(query);
        replyBatches.closed((List<?>) query.get("cursors"));
        return response;
    }

    @Override
    public void closeCursors(List<Long> cursorIds) {
        super.closeCursors(cursorIds);
        replyBatches.closed(cursorIds);
    }

    @Override
    protected MongoDatabase openOrCreateDatabase(String databaseName) {
        return new Database(databaseName, store, getCursorRegistry());
    }

    private static final class Database extends H2Database {

        Database(String databaseName, MVStore mvStore, CursorRegistry cursorRegistry) {
            super(databaseName, mvStore, cursorRegistry);
        }

        @Override
        protected MongoCollection<Object> openOrCreateCollection(String collectionName,
                                                                 CollectionOptions options) {
            String fullName = getFullCollectionNamespace(collectionName);
            MVMap<Object, Document> dataMap = store.openMap(DATA_PREFIX + fullName,
                new MVMap.Builder<Object, Document>().keyType(new ObjectKeyType())
                    .valueType(new DocumentValueType()));
            MVMap<String, Object> metaMap = store.openMap(META_PREFIX + fullName);
            return new Collection(this, collectionName, options, dataMap, metaMap, cursorRegistry);
        }

        /**
         * A non-unique index, kept by our backend (the library's own is an empty stand-in that
         * never answers a query); with {@code snapmap.mongo.secondaryIndexes=library}, the
         * library's stand-in.
         */
        @Override
        protected Index<Object> openOrCreateSecondaryIndex(String collectionName,
                                                           String indexName,
                                                           List<IndexKey> keys,
                                                           boolean sparse) {
            if (!secondaryIndexes) {
                return super.openOrCreateSecondaryIndex(collectionName, indexName, keys, sparse);
            }
            return new SecondaryIndex(indexName, keys, sparse);
        }

        @Override
        protected Index<Object> openOrCreateUniqueIndex(String collectionName, String indexName,
                                                        List<IndexKey> keys, boolean sparse) {
            if (!cachedIndexKeys) {
                return super.openOrCreateUniqueIndex(collectionName, indexName, keys, sparse);
            }
            String mapName = getFullCollectionNamespace(collectionName) + INDEX_INFIX + indexName;
            MVMap<Object, Object> map = store.openMap(mapName,
                new MVMap.Builder<Object, Object>().keyType(new IndexKeyType()));
            Index<Object> index = super.openOrCreateUniqueIndex(collectionName, indexName, keys,
                                                                sparse);
            if (!(map.getKeyType() instanceof IndexKeyType) || indexMap(index) != map) {
                log.warn("index {} compares its keys the library's slow way: its map is not the "
                         + "one opened for it as {}", indexName, mapName);
            }
            return index;
        }
    }

    /** The map behind a library index, or null when that cannot be read. */
    private static Object indexMap(Index<Object> index) {
        try {
            Field field = H2UniqueIndex.class.getDeclaredField("mvMap");
            field.setAccessible(true);
            return field.get(index);
        } catch (ReflectiveOperationException | RuntimeException e) {
            return null;
        }
    }

    private static final class Collection extends H2Collection {

        /**
         * Above this share of the collection, the documents an index names are read by a scan
         * instead of one lookup each (same answer, and a scan reads them in file order).
         */
        private static final double MAX_LOOKUP_SHARE = 0.25;

        /**
         * A sorted page is not read in an index's order when that index's range of the query
         * holds more than this many times the documents named by the most selective index: the
         * walk could read its whole range before the page fills, where reading and sorting the
         * named documents reads only those.
         */
        private static final int MAX_WALK_SHARE = 4;

        private final MVMap<Object, Document> dataMap;

        Collection(MongoDatabase database, String collectionName, CollectionOptions options,
                   MVMap<Object, Document> dataMap, MVMap<String, Object> metaMap,
                   CursorRegistry cursorRegistry) {
            super(database, collectionName, options, dataMap, metaMap, cursorRegistry);
            this.dataMap = dataMap;
        }

        /**
         * Adds an index; a new non-unique index is filled here in one pass over the documents.
         * The library fills an empty index with two passes (every document checked, then every
         * document added), which made each non-unique index cost two reads of its collection
         * when the server opens a store. A document the index refuses (parallel arrays) empties
         * it again and fails the build, as the library's check does.
         */
        @Override
        public synchronized void addIndex(Index<Object> index) {
            boolean known = getIndexes().stream()
                .anyMatch(existing -> existing.getName().equals(index.getName()));
            if (index instanceof SecondaryIndex && index.isEmpty() && !known) {
                try {
                    streamAllDocumentsWithPosition().forEach(stored -> {
                        index.checkAdd(stored.getDocument(), this);
                        index.add(stored.getDocument(), stored.getPosition(), this);
                    });
                } catch (MongoServerError e) {
                    index.drop();
                    throw new IndexBuildFailedException(e, this);
                }
            }
            super.addIndex(index);
        }

        @Override
        public synchronized void dropIndex(String indexName) {
            super.dropIndex(indexName);
        }

        /**
         * A query that names every key of a unique index with a plain value, plus further
         * conditions ({@code {_id: X, version: 3}}), is answered from that index and the rest
         * matched on the documents found. The library uses an index only when the query has
         * exactly its keys, so such a query (the pipeline's conditional writes) scanned the
         * whole collection; MongoDB answers it from the index.
         */
        @Override
        protected QueryResult queryDocuments(Document query, Document orderBy, int numberToSkip,
                                             int limit, int batchSize, Document fieldSelector) {
            for (Index<Object> index : getIndexes()) {
                if (index.canHandle(query)) {
                    return super.queryDocuments(query, orderBy, numberToSkip, limit, batchSize,
                        fieldSelector);
                }
            }
            for (Index<Object> index : getIndexes()) {
                Document equalities = plainEqualities(query, index);
                if (equalities != null && index.canHandle(equalities)) {
                    return matchDocuments(query, index.getPositions(equalities), orderBy,
                        numberToSkip, limit, batchSize, fieldSelector);
                }
            }
            if (!isNatural(orderBy)) {
                Set<Object> candidates = candidates(query);
                if (limit > 0 && (candidates == null
                                  || candidates.size() > (long) numberToSkip + limit)) {
                    QueryResult page = pageInIndexOrder(query, orderBy, numberToSkip, limit,
                        batchSize, fieldSelector, candidates);
                    if (page != null) {
                        return page;
                    }
                }
                if (candidates != null && candidates.size() <= MAX_LOOKUP_SHARE * count()) {
                    return matchDocumentsFromStream(inStoreOrder(candidates), query, orderBy,
                        numberToSkip, limit, batchSize, fieldSelector);
                }
            }
            return super.queryDocuments(query, orderBy, numberToSkip, limit, batchSize,
                fieldSelector);
        }

        /**
         * A sorted page ({@code limit} documents after {@code numberToSkip}) read from a
         * non-unique index whose first key is the sort's first key, in the index's order, up to
         * the page's end: the library would match and sort every document first, which for a
         * page of a large range took longer than the client waits. Null when no index can give
         * that order ({@link SecondaryIndex#groupsInOrder}), or when the {@code candidates} that
         * the indexes name (null: unbounded) are far fewer than the walk's range.
         *
         * <p>The documents are read a group of equal first keys at a time, each group in the
         * order a scan reads them, until the groups read hold enough matches; those are then
         * sorted by the library's own comparison on the whole sort. Every document outside
         * those groups sorts after them, so the page, ties included, is the one a scan and a
         * stable sort give. That holds only while the library's comparison is a consistent
         * order on the documents read: when one of them holds, on a key of the sort, a number
         * it compares inconsistently ({@link SecondaryIndex#sortsInconsistently}), sorting
         * those alone can give another order than sorting every match (or fail where that
         * does not), so the page is left to the sort of every match. Such numbers in documents
         * of groups not read are not looked for.
         */
        private QueryResult pageInIndexOrder(Document query, Document orderBy, int numberToSkip,
                                             int limit, int batchSize, Document fieldSelector,
                                             Set<Object> candidates) {
            if (orderBy == null || orderBy.isEmpty()) {
                return null;
            }
            String firstKey = orderBy.keySet().iterator().next();
            Object direction = orderBy.get(firstKey);
            if (!(direction instanceof Number)
                || Math.abs(((Number) direction).doubleValue()) != 1.0) {
                return null;
            }
            boolean ascending = ((Number) direction).doubleValue() > 0;
            for (Index<Object> index : getIndexes()) {
                if (!(index instanceof SecondaryIndex) || !index.getKeys().get(0).getKey()
                    .equals(firstKey)) {
                    continue;
                }
                List<Object[]> groups = ((SecondaryIndex) index).groupsInOrder(query, ascending);
                if (groups == null) {
                    continue;
                }
                if (candidates != null) {
                    long range = 0;
                    for (Object[] group : groups) {
                        range += group.length;
                    }
                    if (range > (long) MAX_WALK_SHARE * candidates.size()) {
                        return null;
                    }
                }
                long wanted = (long) numberToSkip + limit;
                List<Document> matched = new ArrayList<>();
                for (Object[] group : groups) {
                    if (matched.size() >= wanted) {
                        break;
                    }
                    inStoreOrder(Arrays.asList(group))
                        .filter(document -> documentMatchesQuery(document, query))
                        .forEach(matched::add);
                }
                if (matched.stream().anyMatch(document -> SecondaryIndex
                    .sortsInconsistently(document, orderBy.keySet()))) {
                    return null;
                }
                return matchDocumentsFromStream(query, matched.stream(), numberToSkip, limit,
                    batchSize, deriveComparator(orderBy), fieldSelector);
            }
            return null;
        }

        /**
         * The {@code _id}s of every document that may match {@code query}, from the collection's
         * indexes, or null when none of them bounds it. Several ways of bounding it (an index,
         * a clause of {@code $and}, all clauses of {@code $or}) give several such sets; the
         * smallest is taken. The whole query is matched on every document named.
         */
        private Set<Object> candidates(Document query) {
            Set<Object> best = null;
            for (Index<Object> index : getIndexes()) {
                Set<Object> found = null;
                if (index instanceof SecondaryIndex) {
                    found = ((SecondaryIndex) index).candidates(query);
                } else {
                    Document equalities = plainEqualities(query, index);
                    if (equalities != null && index.canHandle(equalities)) {
                        found = new HashSet<>();
                        index.getPositions(equalities).forEach(found::add);
                    }
                }
                best = smaller(best, found);
            }
            if (query.get("$and") instanceof List<?>) {
                for (Object clause : (List<?>) query.get("$and")) {
                    if (clause instanceof Document) {
                        best = smaller(best, candidates((Document) clause));
                    }
                }
            }
            if (query.get("$or") instanceof List<?> && !((List<?>) query.get("$or")).isEmpty()) {
                Set<Object> union = new HashSet<>();
                for (Object clause : (List<?>) query.get("$or")) {
                    Set<Object> found = clause instanceof Document
                        ? candidates((Document) clause) : null;
                    if (found == null) {
                        union = null;
                        break;
                    }
                    union.addAll(found);
                }
                best = smaller(best, union);
            }
            return best;
        }

        private static Set<Object> smaller(Set<Object> a, Set<Object> b) {
            if (a == null) {
                return b;
            }
            return b == null || a.size() <= b.size() ? a : b;
        }

        /**
         * The documents, in the order a scan reads them (the {@code _id} map's key order), so
         * that an unsorted or tied answer, and what a limit keeps of it, are the scan's.
         */
        private Stream<Document> inStoreOrder(java.util.Collection<Object> positions) {
            List<Object> sorted = new ArrayList<>(positions);
            DataType<Object> keyType = dataMap.getKeyType();
            sorted.sort(keyType::compare);
            // A document removed by a writer that does not hold this collection's monitor
            // (the library's count) is skipped.
            return sorted.stream().map(dataMap::get).filter(Objects::nonNull);
        }

        private static boolean isNatural(Document orderBy) {
            return orderBy != null && orderBy.containsKey("$natural");
        }

        /** The query's values for the index's keys, when it is unique and every one of them
         * is a plain value (no operator, sub-document, array, regular expression or null); or,
         * for a single-key unique index, an {@code $in} list of plain values. */
        private static Document plainEqualities(Document query, Index<Object> index) {
            if (!index.isUnique()) {
                return null;
            }
            Document equalities = new Document();
            for (IndexKey key : index.getKeys()) {
                Object value = query.get(key.getKey());
                boolean plainIn = index.getKeys().size() == 1 && value instanceof Document in
                    && in.size() == 1 && in.get("$in") instanceof java.util.Collection<?> values
                    && values.stream().allMatch(Collection::isPlainValue);
                if (!plainIn && !isPlainValue(value)) {
                    return null;
                }
                equalities.put(key.getKey(), value);
            }
            return equalities;
        }

        private static boolean isPlainValue(Object value) {
            return value != null && !(value instanceof Document)
                && !(value instanceof java.util.Collection<?>)
                && !BsonRegularExpression.isRegularExpression(value);
        }

        /** Long {@code $in} lists are matched by hash lookups ({@link InLists}). */
        @Override
        protected boolean documentMatchesQuery(Document document, Document query) {
            return InLists.matches(document, query, super::documentMatchesQuery);
        }
    }
}
