package snapmap.localstack.mongo;

import java.util.ArrayList;
import java.util.Comparator;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;

import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

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
 * <li>a cursor idle for 10 minutes (MongoDB's default {@code cursorTimeoutMillis}; the
 *     server's {@code snapmap.mongo.cursorTimeoutMillis}) is closed by a sweep every few
 *     seconds, whether or not any other request comes: a client that dies without closing its
 *     cursors would otherwise leave their documents in the server's heap for good;</li>
 * <li>a cursor's id is random, as MongoDB's are, and a {@code getMore} must name the
 *     cursor's own namespace: the library numbers cursors 1, 2, 3... from each start, so a
 *     client still holding a cursor from before a restart continued, without an error, the
 *     cursor that a new {@code find} (of any collection) had just been given.</li>
 * </ul>
 * The documents and their order are the library's: it has matched, sorted, skipped, limited and
 * projected all of them before the first batch is cut, as before.
 *
 * <p>Unlike MongoDB, which reads a cursor's documents from the collection as they are asked
 * for, a cursor here holds the rest of its answer in the heap (an aggregate's computed
 * documents are its own copy). So the open cursors may hold at most a set number of bytes of
 * documents, measured as BSON (the server's {@code snapmap.mongo.cursorMemoryMiB}, 512 MiB by
 * default): a new cursor that would take them over that closes the least recently used other
 * cursors first, and a client that asks one of those for more gets CursorNotFound (43), as
 * after a timeout. A cursor larger than the limit on its own is still opened.
 */
final class ReplyBatches {

    /** Documents per reply, in BSON bytes: MongoDB's limit, the maximum size of a document. */
    static final int MAX_BATCH_BYTES = BsonConstants.MAX_BSON_OBJECT_SIZE;
    /** MongoDB's first batch of a find or aggregate when the client asks for no size. */
    static final int DEFAULT_FIRST_BATCH = 101;
    /** Our cursor ids start here, above the library's own sequential ones. */
    private static final long FIRST_RANDOM_ID = 1L << 32;
    /** MongoDB's default cursorTimeoutMillis. */
    static final long DEFAULT_IDLE_TIMEOUT_MILLIS = TimeUnit.MINUTES.toMillis(10);
    /** What the open cursors may hold by default, in MiB of BSON. */
    static final long DEFAULT_MEMORY_MIB = 512;
    /** The idle cursors are looked for this often at most (MongoDB's own sweep: 4 s). */
    private static final long SWEEP_PERIOD_MILLIS = 4000;

    private static final Logger log = LoggerFactory.getLogger(ReplyBatches.class);

    private final CursorRegistry registry;
    private final long idleTimeoutNanos;
    private final long maxHeldBytes;
    /** The cursors of ours that the client may still ask for, by id. */
    private final Map<Long, BatchCursor> open = new ConcurrentHashMap<>();
    /** Taken to open a cursor, so that two opened at once do not both pass the limit. */
    private final Object admission = new Object();
    private final AtomicLong timedOut = new AtomicLong();
    private final ScheduledExecutorService sweeper;

    /**
     * Closes the cursors idle for {@code idleTimeoutMillis}, looked for every 4 s (or every
     * quarter of the timeout when that is shorter), and keeps the documents the open cursors
     * hold to {@code maxHeldBytes}.
     */
    ReplyBatches(CursorRegistry registry, long idleTimeoutMillis, long maxHeldBytes) {
        this.registry = registry;
        this.idleTimeoutNanos = TimeUnit.MILLISECONDS.toNanos(idleTimeoutMillis);
        this.maxHeldBytes = maxHeldBytes;
        long period = Math.max(10, Math.min(SWEEP_PERIOD_MILLIS, idleTimeoutMillis / 4));
        sweeper = Executors.newSingleThreadScheduledExecutor(task -> {
            Thread thread = new Thread(task, "cursor-timeout");
            thread.setDaemon(true);
            return thread;
        });
        sweeper.scheduleWithFixedDelay(this::sweep, period, period, TimeUnit.MILLISECONDS);
    }

    /** Stops the sweeps (the cursors themselves go with the process). */
    void close() {
        sweeper.shutdownNow();
    }

    /** How many cursors have been closed for being idle too long, as serverStatus reports. */
    long timedOut() {
        return timedOut.get();
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
            String namespace = String.valueOf(cursorDocument.get("ns"));
            // Each document left is measured here once; the getMores cut their batches by
            // these sizes, and the open cursors are held to their limit by them.
            int[] sizes = new int[documents.size()];
            long bytes = 0;
            ByteBuf buffer = Unpooled.buffer();
            try {
                for (int i = end; i < documents.size(); i++) {
                    sizes[i] = bsonSize(documents.get(i), buffer);
                    bytes += sizes[i];
                }
            } finally {
                buffer.release();
            }
            synchronized (admission) {
                expireIdleCursors();
                makeRoom(bytes);
                BatchCursor cursor;
                do {
                    long id = ThreadLocalRandom.current().nextLong(FIRST_RANDOM_ID,
                                                                   Long.MAX_VALUE);
                    cursor = new BatchCursor(id, namespace, documents, sizes, end, bytes);
                } while (open.putIfAbsent(cursor.getId(), cursor) != null);
                registry.add(cursor);
                cursorId = cursor.getId();
            }
        }
        cursorDocument.put("id", cursorId);
        return response;
    }

    /**
     * Closes the least recently used cursors until a new one of {@code bytes} fits beside the
     * rest within the limit; a cursor serving a getMore right now is left open. When the new
     * cursor is larger than the limit on its own, every other cursor is closed.
     */
    private void makeRoom(long bytes) {
        long held = 0;
        for (BatchCursor cursor : open.values()) {
            held += cursor.heldBytes;
        }
        if (held + bytes <= maxHeldBytes) {
            return;
        }
        // Their times of last use are taken once: a getMore may change one during the sort.
        List<LastUse> byLastUse = new ArrayList<>();
        for (BatchCursor cursor : open.values()) {
            byLastUse.add(new LastUse(cursor.lastUsed, cursor));
        }
        byLastUse.sort(Comparator.comparingLong(LastUse::nanos));
        for (LastUse lastUse : byLastUse) {
            BatchCursor cursor = lastUse.cursor();
            if (held + bytes <= maxHeldBytes) {
                break;
            }
            if (cursor.busy) {
                continue;
            }
            long freed = cursor.heldBytes;
            if (close(cursor)) {
                held -= freed;
                log.info("closed cursor {} of {} holding {} bytes of documents, unread for {} ms:"
                         + " a new cursor of {} bytes would have taken the open ones over {}"
                         + " bytes", cursor.getId(), cursor.namespace, freed,
                         TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - cursor.lastUsed),
                         bytes, maxHeldBytes);
            }
        }
    }

    private record LastUse(long nanos, BatchCursor cursor) {
    }

    /** Forgets a cursor; false when it was already gone (read to its end, killed, closed). */
    private boolean close(BatchCursor cursor) {
        boolean removed = open.remove(cursor.getId(), cursor);
        registry.remove(cursor.getId());
        return removed;
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

    /** The sweeper's task; an exception must not end the sweeps. */
    private void sweep() {
        try {
            expireIdleCursors();
        } catch (RuntimeException e) {
            log.warn("sweeping idle cursors failed", e);
        }
    }

    /** Closes the cursors no client has asked for in the idle timeout. */
    private void expireIdleCursors() {
        long now = System.nanoTime();
        for (BatchCursor cursor : open.values()) {
            if (!cursor.busy && now - cursor.lastUsed > idleTimeoutNanos && close(cursor)) {
                timedOut.incrementAndGet();
                log.info("closed cursor {} of {}: unread for {} ms", cursor.getId(),
                         cursor.namespace, TimeUnit.NANOSECONDS.toMillis(now - cursor.lastUsed));
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
                int size = bsonSize(documents.get(end), buffer);
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

    /** As {@link #batchEnd(List, int, int)}, with each document's size already measured. */
    static int batchEnd(int[] sizes, int from, int count) {
        int end = from;
        long bytes = 0;
        while (end < sizes.length && end - from < count) {
            if (end > from && bytes + sizes[end] > MAX_BATCH_BYTES) {
                break;
            }
            bytes += sizes[end];
            end++;
        }
        return end;
    }

    private static int bsonSize(Document document, ByteBuf buffer) {
        buffer.clear();
        BsonEncoder.encodeDocument(document, buffer);
        return buffer.readableBytes();
    }

    /**
     * The documents of a find or aggregate after its first batch. Each document is let go once
     * it has been sent, so a cursor read to its end holds less and less of the heap.
     */
    private final class BatchCursor implements Cursor {

        private final long id;
        private final String namespace;
        private final List<Document> documents;
        /** Each document's BSON size, measured when the cursor was opened. */
        private final int[] sizes;
        private int next;
        private volatile long lastUsed = System.nanoTime();
        /** The BSON bytes of the documents not sent yet. */
        private volatile long heldBytes;
        /** Whether a getMore is taking a batch from it now. */
        private volatile boolean busy;

        BatchCursor(long id, String namespace, List<Document> documents, int[] sizes, int next,
                    long heldBytes) {
            this.id = id;
            this.namespace = namespace;
            this.documents = documents;
            this.sizes = sizes;
            this.next = next;
            this.heldBytes = heldBytes;
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
            busy = true;
            try {
                lastUsed = System.nanoTime();
                int count = numberToReturn > 0 ? numberToReturn : Integer.MAX_VALUE;
                int end = batchEnd(sizes, next, count);
                List<Document> batch = new ArrayList<>(documents.subList(next, end));
                long sent = 0;
                for (int i = next; i < end; i++) {
                    documents.set(i, null);
                    sent += sizes[i];
                }
                next = end;
                heldBytes -= sent;
                if (isEmpty()) {
                    open.remove(id);
                }
                return batch;
            } finally {
                lastUsed = System.nanoTime();
                busy = false;
            }
        }

        @Override
        public String toString() {
            return "BatchCursor(id: " + id + ")";
        }
    }
}
