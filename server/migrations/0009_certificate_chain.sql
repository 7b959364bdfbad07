-- Every certificate of the chain a target sent, described field by field (JSON).
ALTER TABLE tls_certificates ADD COLUMN chain TEXT NOT NULL DEFAULT '[]';
-- What an auditor flags in it, with severities (JSON).
ALTER TABLE tls_certificates ADD COLUMN findings TEXT NOT NULL DEFAULT '[]';
