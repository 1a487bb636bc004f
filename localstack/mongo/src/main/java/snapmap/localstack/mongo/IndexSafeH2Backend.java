package snapmap.localstack.mongo;

import org.h2.mvstore.MVMap;
import org.h2.mvstore.MVStore;

import de.bwaldvogel.mongo.MongoCollection;
import de.bwaldvogel.mongo.MongoDatabase;
import de.bwaldvogel.mongo.backend.CollectionOptions;
import de.bwaldvogel.mongo.backend.CursorRegistry;
import de.bwaldvogel.mongo.backend.Index;
import de.bwaldvogel.mongo.backend.h2.H2Backend;
import de.bwaldvogel.mongo.backend.h2.H2Collection;
import de.bwaldvogel.mongo.backend.h2.H2Database;
import de.bwaldvogel.mongo.bson.Document;

/**
 * The H2 backend with index changes serialised against writes.
 *
 * <p>mongo-java-server 1.47 guards a collection's writes and queries with the collection's
 * monitor, but not {@code addIndex} or {@code dropIndex}: a {@code createIndexes} arriving while
 * another client upserts into the same collection changes the index list under the writer's
 * iteration, and the writer fails with a {@code ConcurrentModificationException} that the
 * driver sees as "Unknown error". The pipeline creates its indexes at start while the upload
 * backend may already be writing, so here both index operations take the same monitor.
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

    private static MVStore store;

    private IndexSafeH2Backend(MVStore mvStore) {
        super(mvStore);
    }

    static synchronized IndexSafeH2Backend openStore(String fileName) {
        if (store != null) {
            throw new IllegalStateException("this process already holds a store");
        }
        store = MVStore.open(fileName);
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
            MVMap<Object, Document> dataMap = store.openMap(DATA_PREFIX + fullName);
            MVMap<String, Object> metaMap = store.openMap(META_PREFIX + fullName);
            return new Collection(this, collectionName, options, dataMap, metaMap, cursorRegistry);
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
    }
}
