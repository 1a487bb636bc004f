package snapmap.localstack.mongo;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;

import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

import de.bwaldvogel.mongo.MongoServer;
import de.bwaldvogel.mongo.MongoVersion;
import de.bwaldvogel.mongo.backend.h2.H2Backend;

/**
 * The local stack's MongoDB-compatible server: mongo-java-server speaking the MongoDB wire
 * protocol on one address, with every database kept in a single H2 MVStore file.
 *
 * <p>Usage: {@code LocalMongoServer <host> <port> <data_dir>}. It listens on host:port only
 * and nowhere else, keeps its data in {@code <data_dir>/snapmap.mv.db}, and runs until it is
 * sent SIGTERM or SIGINT, when it stops accepting connections and closes the store so that
 * everything written is on disk. After a SIGKILL the store reopens at its last commit; the
 * store commits in the background about once a second, so at most that much can be lost.
 *
 * <p>Only one server can hold a data dir at a time: the MVStore file is locked while open.
 *
 * <p>The system property {@code snapmap.mongo.indexKeys} chooses how unique-index keys are
 * compared: {@code cached} (the default, see {@link IndexKeyType}) or {@code library} (the
 * library's own way, much slower). Both read and write the same store format, so a store can
 * be opened with either; {@code library} is there to check that, and to rule the cache out.
 *
 * <p>The system property {@code snapmap.mongo.secondaryIndexes} chooses whether non-unique
 * indexes are kept and used to answer queries: {@code kept} (the default, see
 * {@link SecondaryIndex}) or {@code library} (listed but inert, every such query a scan). They
 * are held in memory and rebuilt when the store opens, so the store's format does not depend on
 * it either.
 *
 * <p>The system property {@code snapmap.mongo.cursorTimeoutMillis} is how long a cursor may go
 * unread before it is closed (600000, MongoDB's default, unless set), and
 * {@code snapmap.mongo.cursorMemoryMiB} how many MiB of documents (as BSON) the open cursors
 * may hold together (512 unless set); see {@link ReplyBatches}.
 */
public final class LocalMongoServer {

    static final String STORE_FILE = "snapmap.mv.db";
    static final String INDEX_KEYS_PROPERTY = "snapmap.mongo.indexKeys";
    static final String SECONDARY_INDEXES_PROPERTY = "snapmap.mongo.secondaryIndexes";
    static final String CURSOR_TIMEOUT_PROPERTY = "snapmap.mongo.cursorTimeoutMillis";
    static final String CURSOR_MEMORY_PROPERTY = "snapmap.mongo.cursorMemoryMiB";

    /**
     * What the server tells drivers it is. The library's own choices all announce wire version 8
     * (MongoDB 4.2 or older), which pymongo 4.x refuses outright; 9 (MongoDB 4.4) is the oldest
     * it accepts. pymongo uses nothing newer unless the caller asks for it, and the probe
     * (probe.py) checks what the pipeline needs against this server.
     */
    static final MongoVersion ANNOUNCED_VERSION = new MongoVersion() {
        @Override
        public List<Integer> getVersionArray() {
            return List.of(4, 4, 0);
        }

        @Override
        public int getWireVersion() {
            return 9;
        }
    };

    private static final Logger log = LoggerFactory.getLogger(LocalMongoServer.class);

    private LocalMongoServer() {
    }

    public static void main(String[] args) {
        if (args.length != 3) {
            System.err.println("usage: LocalMongoServer <host> <port> <data_dir>");
            System.exit(2);
        }
        String host = args[0];
        int port = parsePort(args[1]);
        Path store = Path.of(args[2]).toAbsolutePath().resolve(STORE_FILE);
        String indexKeys = System.getProperty(INDEX_KEYS_PROPERTY, "cached");
        if (!indexKeys.equals("cached") && !indexKeys.equals("library")) {
            System.err.println(INDEX_KEYS_PROPERTY + " must be 'cached' or 'library', got '"
                               + indexKeys + "'");
            System.exit(2);
        }
        String secondaryIndexes = System.getProperty(SECONDARY_INDEXES_PROPERTY, "kept");
        if (!secondaryIndexes.equals("kept") && !secondaryIndexes.equals("library")) {
            System.err.println(SECONDARY_INDEXES_PROPERTY + " must be 'kept' or 'library', got '"
                               + secondaryIndexes + "'");
            System.exit(2);
        }
        long cursorTimeoutMillis = positiveLong(CURSOR_TIMEOUT_PROPERTY,
                                                ReplyBatches.DEFAULT_IDLE_TIMEOUT_MILLIS);
        long cursorMemoryMiB = positiveLong(CURSOR_MEMORY_PROPERTY,
                                            ReplyBatches.DEFAULT_MEMORY_MIB);

        H2Backend backend;
        try {
            Files.createDirectories(store.getParent());
            backend = IndexSafeH2Backend.openStore(store.toString(),
                                                   indexKeys.equals("cached"),
                                                   secondaryIndexes.equals("kept"),
                                                   cursorTimeoutMillis,
                                                   cursorMemoryMiB * 1024 * 1024);
        } catch (IOException | RuntimeException e) {
            // The usual cause is another server still holding the store's file lock.
            System.err.println("cannot open data store " + store + ": " + e.getMessage());
            System.exit(1);
            return;
        }

        backend.version(ANNOUNCED_VERSION);
        MongoServer server = new MongoServer(backend);
        try {
            server.bind(host, port);
        } catch (RuntimeException e) {
            backend.close();
            System.err.println("cannot listen on " + host + ":" + port + ": " + e.getMessage());
            System.exit(1);
            return;
        }

        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            log.info("stopping: closing connections and the data store");
            server.shutdown();
            backend.close();
        }, "local-mongo-shutdown"));
        log.info("listening on {}:{} with data in {}", host, port, store);
        log.info("unique index keys are compared {} ({}={})",
                 indexKeys.equals("cached") ? "by their cached serialised form"
                                            : "the library's way, serialised at every comparison",
                 INDEX_KEYS_PROPERTY, indexKeys);
        log.info("non-unique indexes are {} ({}={})",
                 secondaryIndexes.equals("kept") ? "kept in memory and used by queries"
                                                 : "listed only, as in the library",
                 SECONDARY_INDEXES_PROPERTY, secondaryIndexes);
        log.info("cursors are closed after {} ms unread ({}), and the least recently used when"
                 + " the open ones would hold more than {} MiB of documents ({})",
                 cursorTimeoutMillis, CURSOR_TIMEOUT_PROPERTY, cursorMemoryMiB,
                 CURSOR_MEMORY_PROPERTY);
    }

    /** A system property that must be a whole number above 0, or its default when unset. */
    private static long positiveLong(String property, long defaultValue) {
        String text = System.getProperty(property);
        if (text == null) {
            return defaultValue;
        }
        try {
            long value = Long.parseLong(text.trim());
            // At most 2^40 (milliseconds or MiB): beyond that nothing changes but overflow.
            if (value > 0 && value <= 1L << 40) {
                return value;
            }
        } catch (NumberFormatException e) {
            // reported below
        }
        System.err.println(property + " must be a whole number from 1 to 2^40, got '" + text
                           + "'");
        System.exit(2);
        return -1;
    }

    private static int parsePort(String text) {
        try {
            int port = Integer.parseInt(text);
            if (port > 0 && port < 65536) {
                return port;
            }
        } catch (NumberFormatException e) {
            // reported below, with the usage
        }
        System.err.println("port must be a number from 1 to 65535, got '" + text + "'");
        System.exit(2);
        return -1;
    }
}
