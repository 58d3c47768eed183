-- get_and_lock_slave_commands: order, limit, locking, lock timeout, expiry, parameter checks.
begin;
\ir fixtures/world.sql
select plan(23);

-- Created oldest first, in an order that differs from the hand-out order.
select tests.command('ESP32_ALICE_1', 'manual', 10, now() - interval '50 s') as manual_old \gset
select tests.command('ESP32_ALICE_1', 'manual', 90, now() - interval '40 s') as manual_high \gset
select tests.command('ESP32_ALICE_1', 'rule', 50, now() - interval '30 s') as rule_mid \gset
select tests.command('ESP32_ALICE_1', 'peristaltic', 10, now() - interval '20 s') as peri_low \gset
select tests.command('ESP32_ALICE_1', 'rule', 50, now() - interval '35 s') as rule_older \gset
select tests.command('ESP32_ALICE_1', 'automation', 50, now() - interval '10 s') as auto_mid \gset
select tests.command('ESP32_ALICE_1', 'manual', 10, now() - interval '45 s') as manual_new \gset
select tests.command('ESP32_ALICE_2', 'peristaltic', 100, now() - interval '60 s') as other_master \gset
select tests.command('ESP32_ALICE_1', 'peristaltic', 100, now() - interval '10 minutes', now() - interval '1 second') as expired_one \gset

select tests.as_agent('pi-alice');

select results_eq(
  'select id from get_and_lock_slave_commands(''ESP32_ALICE_1'', 5, 30)',
  format('values (%s::bigint), (%s), (%s), (%s), (%s)', :peri_low, :rule_older, :rule_mid, :auto_mid, :manual_high),
  'the first five come out peristaltic > rule > automation > manual, then priority DESC, created_at ASC');

select results_eq(
  'select id from get_and_lock_slave_commands(''ESP32_ALICE_1'', 5, 30)',
  format('values (%s::bigint), (%s)', :manual_old, :manual_new),
  'a second call hands out only what is left, oldest manual first, and respects no lock twice');

select is_empty(
  'select id from get_and_lock_slave_commands(''ESP32_ALICE_1'', 5, 30)',
  'nothing is handed out while every command is locked');

select tests.as_superuser();
select is((select status from relay_commands_slave where id = :expired_one), 'expired',
  'a command past its expiry is marked expired instead of handed out');
select is((select error_message from relay_commands_slave where id = :expired_one), 'expired before delivery',
  'an expired command says why');
select is((select count(*) from relay_commands_slave where master_device_id = 'ESP32_ALICE_1' and status = 'processing'),
  7::bigint, 'every handed-out command is processing');
select is((select delivery_count from relay_commands_slave where id = :peri_low), 1,
  'a command handed out once has delivery_count 1');
select is((select locked_by from relay_commands_slave where id = :peri_low), 'agent:pi-alice',
  'the lock records which agent holds it');
select is((select status from relay_commands_slave where id = :other_master), 'pending',
  'another master''s command is untouched');

-- The lock of one command times out.
update relay_commands_slave set locked_at = now() - interval '31 seconds' where id = :rule_mid;
select tests.as_agent('pi-alice');
select results_eq(
  'select id, delivery_count from get_and_lock_slave_commands(''ESP32_ALICE_1'', 5, 30)',
  format('values (%s::bigint, 2)', :rule_mid),
  'a command whose lock is older than the timeout is handed out again, counted as a second delivery');
select is_empty(
  'select id from get_and_lock_slave_commands(''ESP32_ALICE_1'', 5, 60)',
  'with a longer timeout the same lock still holds');

-- A timed-out lock on a live command is handed out again; one on an expired command is expired.
select tests.as_superuser();
select tests.command('ESP32_ALICE_2', 'manual', 10, now() - interval '10 minutes', now() + interval '1 hour') as stale \gset
update relay_commands_slave set status = 'processing', locked_at = now() - interval '10 minutes' where id = :stale;
select tests.command('ESP32_ALICE_2', 'manual', 10, now() - interval '10 minutes', now() - interval '1 second') as died \gset
-- Replica mode skips the guard trigger, to stage a lock taken before the expiry passed.
set local session_replication_role = replica;
update relay_commands_slave set status = 'processing', locked_at = now() - interval '9 minutes' where id = :died;
set local session_replication_role = origin;
select tests.as_agent('pi-alice-2');
select results_eq(
  'select id from get_and_lock_slave_commands(''ESP32_ALICE_2'', 5, 30)',
  format('values (%s::bigint), (%s)', :other_master, :stale),
  'a timed-out lock on a live command is handed out again after the higher-ranked one');
select tests.as_superuser();
select is((select status from relay_commands_slave where id = :died), 'expired',
  'a command whose lock timed out after its expiry is expired, not handed out again');
select tests.as_agent('pi-alice');

select throws_ok('select * from get_and_lock_slave_commands(''ESP32_ALICE_1'', 0, 30)', '22023',
  'p_limit must be between 1 and 100, got 0', 'p_limit 0 is refused with a clear message');
select throws_ok('select * from get_and_lock_slave_commands(''ESP32_ALICE_1'', 5, 0)', '22023',
  'p_timeout_seconds must be between 1 and 3600, got 0', 'p_timeout_seconds 0 is refused');
select is((select count(*)::int from get_and_lock_slave_commands('ESP32_ALICE_1')), 0,
  'the defaults (5 commands, 30 seconds) apply when omitted');

select tests.as_superuser();
select tests.command('ESP32_ALICE_1', 'manual', 10, now() - interval '1 s') as fresh \gset
select tests.as_agent('pi-alice');
select is((select count(*)::int from get_and_lock_slave_commands('ESP32_ALICE_1')), 1,
  'a new command is handed out with the default arguments');

-- A named call whose answer was lost: the retry returns what it locked, nothing new.
select tests.as_superuser();
select tests.command('ESP32_ALICE_1', 'manual', 10, now() - interval '1 s') as named_a \gset
select tests.command('ESP32_ALICE_1', 'manual', 10, now() - interval '1 s') as named_b \gset
select tests.as_agent('pi-alice');
select results_eq(
  'select id from get_and_lock_slave_commands(''ESP32_ALICE_1'', 1, 30, ''request-0001'') order by id',
  format('values (%s::bigint)', :named_a),
  'a named call locks as an unnamed one does');
select results_eq(
  'select id from get_and_lock_slave_commands(''ESP32_ALICE_1'', 1, 30, ''request-0001'')',
  format('values (%s::bigint)', :named_a),
  'the same request id again returns what the first call locked, not the next command');
select tests.as_superuser();
select is((select delivery_count from relay_commands_slave where id = :named_a), 1,
  'a retried call does not hand the command out a second time');
select is((select status from relay_commands_slave where id = :named_b), 'pending',
  'a retried call locks nothing new');
select tests.as_agent('pi-alice');
select results_eq(
  'select id from get_and_lock_slave_commands(''ESP32_ALICE_1'', 1, 30, ''request-0002'')',
  format('values (%s::bigint)', :named_b),
  'a new request id locks the next command');
select throws_ok('select * from get_and_lock_slave_commands(''ESP32_ALICE_1'', 1, 30, ''no spaces allowed'')', '22023',
  'p_request_id must be 8..64 characters of A-Z a-z 0-9 _ -', 'a malformed request id is refused');

select * from finish();
rollback;
