<?php
/**
 * Post Swoole task packets to an mqexecutor pool, as seed 000 posts them to a
 * Swoole 1.7.2 server (`task_ipc_mode` 2/3, `message_queue_key`).
 *
 *   mqexecutor serve 0x70001002 --swoole-handler on_task:on_task   # PYTHONPATH=examples/php
 *   php examples/php/swoole_task.php 0x70001002 [WORKER_ID]
 *
 * Sends four demo payloads and prints one JSON line per task:
 *   1. a short string                         (data as is)
 *   2. a PHP array                            (SW_TASK_SERIALIZE: serialize())
 *   3. a 10000-byte string                    (SW_TASK_TMPFILE: >= 8180 bytes)
 *   4. a large PHP array                      (SW_TASK_SERIALIZE | SW_TASK_TMPFILE)
 *
 * The class is seed 000's SwooleTask with these changes:
 *   - it refuses to create the queue (msg_get_queue() would create an unread
 *     queue, mode 0666, when no server runs);
 *   - it sends with message type workerId + 1 as Swoole does (the seed
 *     hard-codes 2); a preemptive pool (mode 3) takes any type;
 *   - it removes its temporary file when msg_send() fails (otherwise the
 *     receiver unlinks it after reading, as Swoole's task worker does).
 */

class SwooleTask
{
    protected $queueId;
    protected $workerId;
    protected $taskId = 1;

    const SW_TASK_TMPFILE = 1;    // tmp file
    const SW_TASK_SERIALIZE = 2;  // php serialize
    const SW_TASK_NONBLOCK = 4;   // task

    const SW_EVENT_TASK = 7;

    /**
     * @param int $key        the pool's SysV key
     * @param int $workerId   task worker to target (message type workerId + 1)
     * @throws Exception      when no queue has this key
     */
    function __construct($key, $workerId = 0)
    {
        if (!msg_queue_exists($key)) {
            throw new \Exception(sprintf("no queue has key 0x%08x: is the pool running?",
                                         $key & 0xFFFFFFFF));
        }
        $this->queueId = msg_get_queue($key);
        if ($this->queueId === false) {
            throw new \Exception("msg_get_queue() failed.");
        }
        $this->workerId = $workerId;
    }

    /** @return array [packet, tmpfile path or null] */
    protected static function pack($taskId, $data)
    {
        $flags = self::SW_TASK_NONBLOCK;
        $type = self::SW_EVENT_TASK;
        $tmpFile = null;
        if (!is_string($data)) {
            $data = serialize($data);
            $flags |= self::SW_TASK_SERIALIZE;
        }
        if (strlen($data) >= 8180) {
            $tmpFile = tempnam('/tmp/', 'swoole.task');
            file_put_contents($tmpFile, $data);
            $data = pack('l', strlen($data)) . $tmpFile . "\0";
            $flags |= self::SW_TASK_TMPFILE;
            $len = 128 + 24;
        } else {
            $len = strlen($data);
        }
        // l: int32, S: uint16, s: int16, C: uint8 -- machine byte order, 12 bytes.
        return [pack('lSsCCS', $taskId, $len, 0, $type, 0, $flags) . $data, $tmpFile];
    }

    /** @return int|false the task id, or false when msg_send() failed */
    function dispatch($data)
    {
        $taskId = $this->taskId++;
        [$packet, $tmpFile] = self::pack($taskId, $data);
        if (!msg_send($this->queueId, $this->workerId + 1, $packet, false)) {
            if ($tmpFile !== null) {
                unlink($tmpFile);
            }
            return false;
        }
        return $taskId;
    }
}

if (PHP_SAPI === 'cli' && isset($argv) && realpath($argv[0]) === __FILE__) {
    if (!extension_loaded('sysvmsg')) {
        fwrite(STDERR, "swoole_task.php: PHP's sysvmsg extension is missing\n");
        exit(2);
    }
    if ($argc < 2) {
        fwrite(STDERR, "usage: php swoole_task.php KEY [WORKER_ID]\n");
        exit(2);
    }
    try {
        $task = new SwooleTask(intval($argv[1], 0), $argc > 2 ? intval($argv[2]) : 0);
    } catch (Exception $e) {
        fwrite(STDERR, "swoole_task.php: " . $e->getMessage() . "\n");
        exit(2);
    }
    $payloads = [
        "Hello from PHP!",
        ['name' => 'Alice', 'mobile' => '13800000000', 'ids' => [1, 2, 3]],
        str_repeat("0123456789", 1000),
        array_fill(0, 1000, 'swoole'),
    ];
    foreach ($payloads as $data) {
        $id = $task->dispatch($data);
        if ($id === false) {
            fwrite(STDERR, "swoole_task.php: msg_send failed\n");
            exit(1);
        }
        $bytes = is_string($data) ? strlen($data) : strlen(serialize($data));
        echo json_encode(['task_id' => $id, 'bytes' => $bytes,
                          'serialized' => !is_string($data)]), "\n";
    }
}
