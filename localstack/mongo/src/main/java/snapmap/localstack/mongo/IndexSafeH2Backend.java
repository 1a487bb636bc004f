package snapmap.localstack.mongo;

import java.lang.reflect.Field;
import java.util.List;

import org.h2.mvstore.MVMap;
import org.h2.mvstore.MVStore;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import de.bwaldvogel.mongo.MongoCollection;
import de.bwaldvogel.mongo.MongoDatabase;
import de.bwaldvogel.mongo.backend.CollectionOptions;
import de.bwaldvogel.mongo.backend.CursorRegistry;
import de.bwaldvogel.mongo.backend.Index;
import de.bwaldvogel.mongo.backend.IndexKey;
import de.bwaldvogel.mongo.backend.QueryResult;
import de.bwaldvogel.mongo.backend.h2.H2Backend;
import de.bwaldvogel.mongo.backend.h2.H2Collection;
import de.bwaldvogel.mongo.backend.h2.H2Database;
import de.bwaldvogel.mongo.backend.h2.H2UniqueIndex;
import de.bwaldvogel.mongo.bson.BsonRegularExpression;
import de.bwaldvogel.mongo.bson.Document;

/**
 * The H2 backend with index changes serialised against writes, cheaper index key comparison,
 * and collection keys compared safely from several threads.
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

    private static final Logger log = LoggerFactory.getLogger(IndexSafeH2Backend.class);

    private static MVStore store;
    private static boolean cachedIndexKeys;

    private IndexSafeH2Backend(MVStore mvStore) {
        super(mvStore);
    }

    /**
     * Opens the store and the databases in it. With {@code cachedIndexKeys} the unique indexes
     * use {@link IndexKeyType}; without, the library's own key type (same format and order).
     */
    static synchronized IndexSafeH2Backend openStore(String fileName, boolean cachedIndexKeys) {
        if (store != null) {
            throw new IllegalStateException("this process already holds a store");
        }
        IndexSafeH2Backend.cachedIndexKeys = cachedIndexKeys;
        store = new MVStore.Builder().fileName(fileName).cacheSize(PAGE_CACHE_MB).open();
        return new IndexSafeH2Backend(store);
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
                new MVMap.Builder<Object, Document>().keyType(new ObjectKeyType()));
            MVMap<String, Object> metaMap = store.openMap(META_PREFIX + fullName);
            return new Collection(this, collectionName, options, dataMap, metaMap, cursorRegistry);
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

        Collection(MongoDatabase database, String collectionName, CollectionOptions options,
                   MVMap<Object, Document> dataMap, MVMap<String, Object> metaMap,
                   CursorRegistry cursorRegistry) {
            super(database, collectionName, options, dataMap, metaMap, cursorRegistry);
        }

        @Override
        public synchronized void addIndex(Index<Object> index) {
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
            return super.queryDocuments(query, orderBy, numberToSkip, limit, batchSize,
                fieldSelector);
        }

        /** The query's values for the index's keys, when it is unique and every one of them
         * is a plain value (no operator, sub-document, array, regular expression or null). */
        private static Document plainEqualities(Document query, Index<Object> index) {
            if (!index.isUnique()) {
                return null;
            }
            Document equalities = new Document();
            for (IndexKey key : index.getKeys()) {
                Object value = query.get(key.getKey());
                if (value == null || value instanceof Document
                    || value instanceof java.util.Collection<?>
                    || BsonRegularExpression.isRegularExpression(value)) {
                    return null;
                }
                equalities.put(key.getKey(), value);
            }
            return equalities;
        }
    }
}
