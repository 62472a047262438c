<?php
/**
 * Post one JSON task to an mqexecutor pool and print its JSON reply.
 *
 *   php examples/php/external_task.php KEY FN [ARGS_JSON] [TIMEOUT_SECONDS]
 *   php examples/php/external_task.php 0x2b2b0001 math:hypot '[3, 4]'
 *   {"v":1,"id":"php-4242-1","ok":true,"result":5.0,"worker":1,"pid":4250}
 *
 * The pool must allow FN: `mqexecutor serve 0x2b2b0001 --allow 'math:*'`.
 * Needs PHP's sysvmsg extension (Debian: apt-get install php-cli).
 * Exit status: 0 the task returned, 1 it failed (error reply), 2 usage or
 * queue problem, 3 no reply within TIMEOUT_SECONDS (default 10).
 * See docs/external.md for the message format.
 */

if (!extension_loaded('sysvmsg')) {
    fwrite(STDERR, "external_task.php: PHP's sysvmsg extension is missing\n");
    exit(2);
}
if ($argc < 3) {
    fwrite(STDERR, "usage: php external_task.php KEY FN [ARGS_JSON] [TIMEOUT_SECONDS]\n");
    exit(2);
}

// Keys are decimal or 0x hex, as `ipcs -q` prints them.
$key = intval($argv[1], 0);
$fn = $argv[2];
$args = json_decode($argc > 3 ? $argv[3] : '[]', true);
$timeout = $argc > 4 ? (float)$argv[4] : 10.0;
if (!is_array($args) || !array_is_list($args)) {
    fwrite(STDERR, "external_task.php: ARGS_JSON must be a JSON array\n");
    exit(2);
}

// Never let msg_get_queue() create the pool's queue: it would make an empty
// queue (mode 0666 by default) that no pool reads.
if (!msg_queue_exists($key)) {
    fwrite(STDERR, sprintf("external_task.php: no queue has key 0x%08x: is the pool running?\n",
                           $key & 0xFFFFFFFF));
    exit(2);
}
$tasks = msg_get_queue($key);

// Our own reply queue, under a fresh random key, readable by this user only.
// Results never come back on the task queue (a worker would take them as tasks).
do {
    $replyKey = random_int(0x10000, 0x7FFFFFFF);
} while (msg_queue_exists($replyKey));
$replies = msg_get_queue($replyKey, 0600);

$status = 0;
try {
    $task = [
        'v' => 1,
        'id' => 'php-' . getmypid() . '-1',
        'fn' => $fn,
        'args' => $args,
        'kwargs' => new stdClass(),   // json_encode([]) would give [], not {}
        'reply' => ['key' => $replyKey, 'mtype' => 1],
    ];
    $json = json_encode($task, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES);

    // serialize=false: send the JSON text itself, not PHP's serialize() of it.
    // blocking=true: wait while the pool's queue is full.
    if (!msg_send($tasks, 1, $json, false, true, $err)) {
        fwrite(STDERR, "external_task.php: msg_send failed, errno $err\n");
        exit(2);
    }

    // Wait for the reply, at most $timeout seconds (poll with MSG_IPC_NOWAIT).
    $deadline = microtime(true) + $timeout;
    $message = null;
    while (true) {
        $ok = msg_receive($replies, 0, $type, 65536, $message, false, MSG_IPC_NOWAIT, $err);
        if ($ok) {
            break;
        }
        if ($err !== MSG_ENOMSG) {
            fwrite(STDERR, "external_task.php: msg_receive failed, errno $err\n");
            exit(2);
        }
        if (microtime(true) > $deadline) {
            fwrite(STDERR, "external_task.php: no reply within $timeout s\n");
            $status = 3;
            break;
        }
        usleep(10000);
    }
    if ($status === 0) {
        $reply = json_decode($message, true, 512, JSON_THROW_ON_ERROR);
        echo $message, "\n";
        if (empty($reply['ok'])) {
            $error = $reply['error'];
            fwrite(STDERR, "external_task.php: {$error['code']}: {$error['type']}: "
                           . "{$error['message']}\n");
            $status = 1;
        }
    }
} finally {
    msg_remove_queue($replies);
}
exit($status);
