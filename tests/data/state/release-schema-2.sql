-- A state database as release 6b34afd (schema version 2: migrations 1-2) left it: three
-- tokens (one revoked), an adopted camera, access decisions, their audit chain and usage.
-- Made by that release's own TokenStore, AdoptedCameras and AccessRecorder, then
-- 'sqlite3 agent.db .dump'. tests/unit/test_state_upgrade.py loads it and upgrades it.
PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES('rev','4');
CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        scope TEXT NOT NULL,
        secret_hash BLOB NOT NULL UNIQUE,
        last4 TEXT NOT NULL,
        protocols TEXT NOT NULL DEFAULT '',
        permission TEXT,
        created_at REAL NOT NULL,
        expires_at REAL,
        label TEXT NOT NULL DEFAULT '',
        created_by TEXT NOT NULL DEFAULT '',
        origin TEXT NOT NULL DEFAULT 'local',
        ttl REAL,
        revoked_at REAL,
        replaced_by TEXT,
        replaces TEXT,
        last_used_at REAL,
        rev INTEGER NOT NULL
    );
INSERT INTO tokens VALUES('X8zfE0sk0ADb','access','camera:lobby',X'85ecb04fca35b2eb251bcaa29f9c09d130fa840aeb2a543da28818aa055f7ebc','xTlw','',NULL,1790000000.0,NULL,'front desk','cli:ops','local',NULL,NULL,NULL,NULL,1790000013.0,1);
INSERT INTO tokens VALUES('lw9iGHABEctd','admin','host:site1',X'5f7635298d2216889405853716611f012790566a87b9d8563a4fb6a0cdb6bc7b','G4mb','',NULL,1790000001.0,NULL,'','cli:ops','local',NULL,NULL,NULL,NULL,1790000012.0,2);
INSERT INTO tokens VALUES('0JSHc41Z10rF','access','host:site1',X'eda6df28482b86883da860b9a8392879010075aab409a6374e92b92f6aad2c38','oq4P','',NULL,1790000002.0,NULL,'','cli:ops','local',NULL,1790000003.0,NULL,NULL,NULL,4);
CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        event TEXT NOT NULL,
        token_id TEXT,
        camera TEXT,
        protocol TEXT,
        peer_ip TEXT,
        actor TEXT,
        result TEXT,
        reason TEXT,
        detail TEXT,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
INSERT INTO audit VALUES(1,1790000000.0,'token.created','X8zfE0sk0ADb',NULL,NULL,NULL,'cli:ops',NULL,NULL,'{"kind":"access","label":"front desk","scope":"camera:lobby"}','0000000000000000000000000000000000000000000000000000000000000000','72f3c57efd4438faddb5bf553122aa801f2ef229e4ab31ce912c2594572a0c49');
INSERT INTO audit VALUES(2,1790000001.0,'token.created','lw9iGHABEctd',NULL,NULL,NULL,'cli:ops',NULL,NULL,'{"kind":"admin","scope":"host:site1"}','72f3c57efd4438faddb5bf553122aa801f2ef229e4ab31ce912c2594572a0c49','d6735bc86416602f348dd4f31ceeefc70c9a3076870b2c155819dca1ee4dbe04');
INSERT INTO audit VALUES(3,1790000002.0,'token.created','0JSHc41Z10rF',NULL,NULL,NULL,'cli:ops',NULL,NULL,'{"kind":"access","scope":"host:site1"}','d6735bc86416602f348dd4f31ceeefc70c9a3076870b2c155819dca1ee4dbe04','0296cea41a6bb1c819751f58637144ff853c46616d731f5a4e4e0e1dd43750b3');
INSERT INTO audit VALUES(4,1790000003.0,'token.revoked','0JSHc41Z10rF',NULL,NULL,NULL,'cli:ops',NULL,NULL,NULL,'0296cea41a6bb1c819751f58637144ff853c46616d731f5a4e4e0e1dd43750b3','5726162e73dba381b557d9317610dd45355d93267ea96e5f43db7dba13ec99e2');
INSERT INTO audit VALUES(5,1790000004.0,'camera.adopted',NULL,'garage',NULL,NULL,'cli:ops',NULL,NULL,'{"identity":"urn:uuid:0b6e2c1e-garage","method":"onvif","profile":"main"}','5726162e73dba381b557d9317610dd45355d93267ea96e5f43db7dba13ec99e2','90051b1f216abd5228f4c6fee5c8096389f36a296983cfff9a299cb421862250');
INSERT INTO audit VALUES(6,1790000010.0,'access.granted','X8zfE0sk0ADb','lobby','webrtc','192.0.2.50',NULL,'granted','granted',NULL,'90051b1f216abd5228f4c6fee5c8096389f36a296983cfff9a299cb421862250','93df19c9415549a1f6e99a5d85ecb1c8758b79fa10d9acd871a3f5df71505834');
INSERT INTO audit VALUES(7,1790000011.0,'access.denied','X8zfE0sk0ADb','garage','webrtc','192.0.2.50',NULL,'denied','scope_mismatch',NULL,'93df19c9415549a1f6e99a5d85ecb1c8758b79fa10d9acd871a3f5df71505834','5f1cc403d83bc888ae8812a1a4003d3b5b1ca20458604ad5724f3f26a38b9809');
INSERT INTO audit VALUES(8,1790000012.0,'access.granted','lw9iGHABEctd',NULL,'admin','192.0.2.50',NULL,'granted','granted',NULL,'5f1cc403d83bc888ae8812a1a4003d3b5b1ca20458604ad5724f3f26a38b9809','d533eecac48a8a0e7a24188a5aa13462e955a42008f0f4a9281521b32eb2a265');
INSERT INTO audit VALUES(9,1790000013.0,'access.granted','X8zfE0sk0ADb',NULL,'api','192.0.2.50',NULL,'granted','granted',NULL,'d533eecac48a8a0e7a24188a5aa13462e955a42008f0f4a9281521b32eb2a265','71c6b36d3479604bdc50e66b9c61a2eb00494d7724c5076b6470ff93964711d6');
INSERT INTO audit VALUES(10,1790000014.0,'access.denied','0JSHc41Z10rF','lobby','snapshot','192.0.2.50',NULL,'denied','revoked',NULL,'71c6b36d3479604bdc50e66b9c61a2eb00494d7724c5076b6470ff93964711d6','8ded42efdecad6608dcb5c4e0398fbe7005d716e348899c0bf8809189a1b64a9');
CREATE TABLE usage_hourly (
        token_id TEXT NOT NULL,
        hour INTEGER NOT NULL,
        protocol TEXT NOT NULL,
        granted INTEGER NOT NULL DEFAULT 0,
        denied INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (token_id, hour, protocol)
    ) WITHOUT ROWID;
INSERT INTO usage_hourly VALUES('0JSHc41Z10rF',497222,'snapshot',0,1);
INSERT INTO usage_hourly VALUES('X8zfE0sk0ADb',497222,'api',1,0);
INSERT INTO usage_hourly VALUES('X8zfE0sk0ADb',497222,'webrtc',1,1);
INSERT INTO usage_hourly VALUES('lw9iGHABEctd',497222,'admin',1,0);
CREATE TABLE usage_ips (
        token_id TEXT NOT NULL,
        ip TEXT NOT NULL,
        count INTEGER NOT NULL,
        last_seen REAL NOT NULL,
        PRIMARY KEY (token_id, ip)
    ) WITHOUT ROWID;
INSERT INTO usage_ips VALUES('0JSHc41Z10rF','192.0.2.50',1,1790000014.0);
INSERT INTO usage_ips VALUES('X8zfE0sk0ADb','192.0.2.50',3,1790000013.0);
INSERT INTO usage_ips VALUES('lw9iGHABEctd','192.0.2.50',1,1790000012.0);
CREATE TABLE adopted_cameras (
        id TEXT PRIMARY KEY,
        identity TEXT NOT NULL UNIQUE,
        method TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        source TEXT NOT NULL,
        username TEXT,
        profile TEXT NOT NULL DEFAULT 'main',
        xaddr TEXT,
        transport TEXT NOT NULL DEFAULT 'tcp',
        adopted_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
INSERT INTO adopted_cameras VALUES('garage','urn:uuid:0b6e2c1e-garage','onvif','Garage','rtsp://192.0.2.20:554/stream1','admin','main','http://192.0.2.20/onvif/device_service','tcp',1790000004.0,1790000004.0);
CREATE TABLE sightings (
        identity TEXT PRIMARY KEY,
        data TEXT NOT NULL,
        last_seen REAL NOT NULL
    );
CREATE INDEX tokens_rev ON tokens (rev);
CREATE INDEX audit_token ON audit (token_id, seq);
CREATE INDEX audit_ts ON audit (ts);
PRAGMA user_version = 2;
COMMIT;
