package snapmap.localstack.mongo;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;

import de.bwaldvogel.mongo.backend.Cursor;
import de.bwaldvogel.mongo.backend.CursorRegistry;
import de.bwaldvogel.mongo.backend.InMemoryCursor;
import de.bwaldvogel.mongo.bson.Document;
import de.bwaldvogel.mongo.exception.MongoServerError;
import de.bwaldvogel.mongo.wire.BsonConstants;
import de.bwaldvogel.mongo.wire.bson.BsonEncoder;
import io.netty.buffer.ByteBuf;
import io.netty.buffer.Unpooled;

/**
 * Cuts the answers of {@code find} and {@code aggregate} into batches the way MongoDB does, and
 * keeps the cursors that serve the rest through {@code getMore}.
 *
 * <p>The library puts every document of a {@code find} without {@code batchSize}, and of every
 * {@code aggregate}, into the first reply, and a {@code getMore} (or a first batch) with a
 * {@code batchSize} takes that many documents whatever their size. A reply larger than the
 * maximum message size (48 MB) is refused by the driver (pymongo raises ProtocolError), and a
 * large one is held whole in memory on both sides. MongoDB's rules, applied here:
 * <ul>
 * <li>a reply holds at most 16 MiB of documents (their BSON); the first document of a batch is
 *     always taken, whatever its size, so that a cursor always moves on;</li>
 * <li>the first batch of a {@code find} or {@code aggregate} holds {@code batchSize} documents,
 *     101 when the client gives none, and none for {@code batchSize: 0};</li>
 * <li>a {@code getMore} without {@code batchSize} (or with 0) is limited by size only;</li>
 * <li>a {@code find} with {@code singleBatch} gets one batch ({@code batchSize} documents when
 *     the client gives one) and no cursor;</li>
 * <li>a cursor idle for 10 minutes is closed, as MongoDB's default
 *     {@code cursorTimeoutMillis} does: a client that dies without closing its cursors would
 *     otherwise leave their documents in the server's heap for good;</li>
 * <li>a cursor's id is random, as MongoDB's are, and a {@code getMore} must name the
 *     cursor's own namespace: the library numbers cursors 1, 2, 3... from each start, so a
 *     client still holding a cursor from before a restart continued, without an error, the
 *     cursor that a new {@code find} (of any collection) had just been given.</li>
 * </ul>
 * The documents and their order are the library's: it has matched, sorted, skipped, limited and
 * projected all of them before the first batch is cut, as before.
 */
final class ReplyBatches {

    /** Documents per reply, in BSON bytes: MongoDB's limit, the maximum size of a document. */
    static final int MAX_BATCH_BYTES = BsonConstants.MAX_BSON_OBJECT_SIZE;
    /** MongoDB's first batch of a find or aggregate when the client asks for no size. */
    static final int DEFAULT_FIRST_BATCH = 101;
    /** Our cursor ids start here, above the library's own sequential ones. */
    private static final long FIRST_RANDOM_ID = 1L << 32;
    /** MongoDB's default cursorTimeoutMillis. */
    static final long IDLE_TIMEOUT_NANOS = TimeUnit.MINUTES.toNanos(10);

    private final CursorRegistry registry;
    /** The cursors of ours that the client may still ask for, by id. */
    private final Map<Long, BatchCursor> open = new ConcurrentHashMap<>();

    ReplyBatches(CursorRegistry registry) {
        this.registry = registry;
    }

    /**
     * Cuts the first batch of a {@code find} or {@code aggregate} reply, in place, and opens a
     * cursor for the rest. {@code batchSize} is the client's (null when absent). A reply that is
     * not a plain cursor reply (an error, or a change stream's cursor, which is not the
     * library's in-memory one) is returned as it is.
     */
    Document cutFirstBatch(Document response, Object batchSize, boolean singleBatch) {
        if (response == null || !(response.get("cursor") instanceof Document)) {
            return response;
        }
        Document cursorDocument = (Document) response.get("cursor");
        if (!(cursorDocument.get("firstBatch") instanceof List<?>)
            || !(cursorDocument.get("id") instanceof Number)) {
            return response;
        }
        @SuppressWarnings("unchecked")
        List<Document> firstBatch = (List<Document>) cursorDocument.get("firstBatch");
        long libraryCursorId = ((Number) cursorDocument.get("id")).longValue();
        List<Document> documents = new ArrayList<>(firstBatch);
        if (libraryCursorId != 0) {
            // The library cut a first batch of batchSize documents and keeps the rest in
            // memory; the rest is taken over here, so that every batch is cut by size too.
            Cursor libraryCursor = registry.getCursor(libraryCursorId);
            if (!(libraryCursor instanceof InMemoryCursor)) {
                return response;
            }
            documents.addAll(libraryCursor.takeDocuments(Integer.MAX_VALUE));
            registry.remove(libraryCursorId);
        }

        int count = DEFAULT_FIRST_BATCH;
        boolean sized = batchSize instanceof Number && ((Number) batchSize).intValue() >= 0;
        if (sized) {
            count = ((Number) batchSize).intValue();
        }
        if (singleBatch && !(sized && count > 0)) {
            // The one batch is cut by size only, unless the client gave it a size.
            count = Integer.MAX_VALUE;
        }
        int end = batchEnd(documents, 0, count);
        cursorDocument.put("firstBatch", new ArrayList<>(documents.subList(0, end)));
        long cursorId = 0;
        if (end < documents.size() && !singleBatch) {
            expireIdleCursors();
            String namespace = String.valueOf(cursorDocument.get("ns"));
            BatchCursor cursor;
            do {
                long id = ThreadLocalRandom.current().nextLong(FIRST_RANDOM_ID, Long.MAX_VALUE);
                cursor = new BatchCursor(id, namespace, documents, end);
            } while (open.putIfAbsent(cursor.getId(), cursor) != null);
            registry.add(cursor);
            cursorId = cursor.getId();
        }
        cursorDocument.put("id", cursorId);
        return response;
    }

    /**
     * Refuses a {@code getMore} on one of our cursors that names another namespace than the
     * cursor's, as MongoDB does (code 13), instead of serving it another collection's documents.
     */
    void checkGetMore(String databaseName, Document query) {
        if (!(query.get("getMore") instanceof Number)) {
            return;
        }
        BatchCursor cursor = open.get(((Number) query.get("getMore")).longValue());
        String namespace = databaseName + "." + query.get("collection");
        if (cursor != null && !cursor.namespace.equals(namespace)) {
            throw new MongoServerError(13, "Unauthorized", "Requested getMore on namespace '"
                + namespace + "', but cursor belongs to a different namespace "
                + cursor.namespace);
        }
    }

    /** The client closed these cursors (killCursors). */
    void closed(List<?> cursorIds) {
        if (cursorIds != null) {
            for (Object id : cursorIds) {
                if (id instanceof Number) {
                    open.remove(((Number) id).longValue());
                }
            }
        }
    }

    /** Closes the cursors no client has asked for in {@link #IDLE_TIMEOUT_NANOS}. */
    private void expireIdleCursors() {
        long now = System.nanoTime();
        for (BatchCursor cursor : open.values()) {
            if (now - cursor.lastUsed > IDLE_TIMEOUT_NANOS) {
                open.remove(cursor.getId());
                registry.remove(cursor.getId());
            }
        }
    }

    /**
     * The end (exclusive) of the batch that starts at {@code from}: at most {@code count}
     * documents and {@link #MAX_BATCH_BYTES} of BSON, but at least one document when any is
     * left and {@code count} is not 0.
     */
    static int batchEnd(List<Document> documents, int from, int count) {
        int end = from;
        long bytes = 0;
        ByteBuf buffer = null;
        try {
            while (end < documents.size() && end - from < count) {
                if (buffer == null) {
                    buffer = Unpooled.buffer();
                }
                buffer.clear();
                BsonEncoder.encodeDocument(documents.get(end), buffer);
                int size = buffer.readableBytes();
                if (end > from && bytes + size > MAX_BATCH_BYTES) {
                    break;
                }
                bytes += size;
                end++;
            }
        } finally {
            if (buffer != null) {
                buffer.release();
            }
        }
        return end;
    }

    /**
     * The documents of a find or aggregate after its first batch. Each document is let go once
     * it has been sent, so a cursor read to its end holds less and less of the heap.
     */
    private final class BatchCursor implements Cursor {

        private final long id;
        private final String namespace;
        private final List<Document> documents;
        private int next;
        private volatile long lastUsed = System.nanoTime();

        BatchCursor(long id, String namespace, List<Document> documents, int next) {
            this.id = id;
            this.namespace = namespace;
            this.documents = documents;
            this.next = next;
            for (int i = 0; i < next; i++) {
                documents.set(i, null);
            }
        }

        @Override
        public long getId() {
            return id;
        }

        @Override
        public synchronized boolean isEmpty() {
            return next >= documents.size();
        }

        /** The next batch: {@code numberToReturn} documents at most (no limit when 0 or less,
         * as for a getMore without batchSize), and at most {@link #MAX_BATCH_BYTES}. */
        @Override
        public synchronized List<Document> takeDocuments(int numberToReturn) {
            lastUsed = System.nanoTime();
            int count = numberToReturn > 0 ? numberToReturn : Integer.MAX_VALUE;
            int end = batchEnd(documents, next, count);
            List<Document> batch = new ArrayList<>(documents.subList(next, end));
            for (int i = next; i < end; i++) {
                documents.set(i, null);
            }
            next = end;
            if (isEmpty()) {
                open.remove(id);
            }
            return batch;
        }

        @Override
        public String toString() {
            return "BatchCursor(id: " + id + ")";
        }
    }
}
