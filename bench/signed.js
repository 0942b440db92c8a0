// For `make bench --only nginx`: nginx checking the service's signed download URL itself
// (see image_api/signing.py), as a deployment without Python on the download path would.
// Only a URL with no parameter but `expires` and `signature` (an original, not a variant).
const crypto = require('crypto');

function signed(r) {
    const args = r.args;
    const expires = args.expires;
    const signature = args.signature;
    if (Object.keys(args).length !== 2 || typeof expires !== 'string'
            || typeof signature !== 'string' || !/^[0-9]{1,12}$/.test(expires)) {
        return '';
    }
    const key = Buffer.from(r.variables.signing_key, 'hex');
    const expected = crypto.createHmac('sha256', key)
        .update(r.uri + '\n' + expires + '\n').digest('base64url');
    return expected === signature && Number(expires) > Date.now() / 1000 ? 'ok' : '';
}

export default { signed };
